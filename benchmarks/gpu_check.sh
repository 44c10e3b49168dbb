#!/usr/bin/env bash
# One-command GPU check (issue 14): on a machine with one NVIDIA GPU and no internet,
#   1. build the environment from the project's files (the Makefile's venv rule; pip reaches
#      only the local package mirror there),
#   2. record the device name and the torch / triton versions (fails without a CUDA GPU),
#   3. run the kernel tests with the Triton kernels compiled for the GPU (not interpreted),
#   4. run benchmarks/kernels.py (cross-entropy and softmax forward + backward at N=8192,
#      C in {32000, 128256}, bfloat16; the head + loss's peak memory at V=128256),
#   4b. run benchmarks/linear_ce_paths.py (linear_cross_entropy with gradients from forward,
#      three matrix products, against the recompute path, four: time and peak memory),
#   5. run benchmarks/overhead.py (each method's cost per step, shortened),
# and write everything they print, with the device, the versions and the date, to one results
# file. Every step's exit status is recorded; a failed step does not stop the next one, and
# the script exits non-zero at the end if any step failed.
#
# Usage: benchmarks/gpu_check.sh [--out DIR] [--dry-run-cpu]
#   --out DIR      folder for the results file (default: $GPU_CHECK_OUT, else
#                  benchmarks/gpu_results); on the lent GPU machine pass --out "$OUT".
#   --dry-run-cpu  the same steps on the CPU: Triton's interpreter, tiny sizes, no GPU needed
#                  (CUDA is hidden), so the script itself can be tested anywhere.
# Each step has a time limit in seconds (GPU_CHECK_TIMEOUT_ENV, _TESTS, _KERNELS, _LCE,
# _OVERHEAD); the GPU limits add up to 580 s (380 s without the environment step, which a
# warm machine skips); the steps normally end well before their limits.
# GPU_CHECK_TESTS overrides the pytest arguments of step 3.
set -u

cd "$(dirname "$0")/.." || exit 2

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

out_dir="${GPU_CHECK_OUT:-benchmarks/gpu_results}"
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out_dir="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) out_dir="${1#--out=}"; shift ;;
        --dry-run-cpu) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

py=.venv/bin/python
export WANDB_MODE=offline PYTHONUNBUFFERED=1
mkdir -p "$out_dir" || exit 2
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
scratch="$(mktemp -d)"  # Lightning's default_root_dir for the overhead fits
trap 'rm -rf "$scratch"' EXIT

if [ "$dry_run" = 1 ]; then
    mode="dry run on the CPU (Triton's interpreter, tiny sizes)"
    results="$out_dir/cpu_dry_run_$stamp.txt"
    # Hide any GPU, and interpret the Triton kernels on CPU tensors (set before Python starts:
    # Triton reads it when first imported).
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 LIGHTNING_NOISE_TEST_DEVICE=cpu
    : "${GPU_CHECK_TIMEOUT_ENV:=300}" "${GPU_CHECK_TIMEOUT_TESTS:=300}"
    : "${GPU_CHECK_TIMEOUT_KERNELS:=300}" "${GPU_CHECK_TIMEOUT_OVERHEAD:=300}"
    # A few of the kernel tests: the whole folder takes minutes in the interpreter.
    tests_args=(tests/kernels/test_kernels.py -k "test_softmax_matches or test_linear_cross_entropy_in_bfloat16")
    kernels_args=(--cpu-rows 256 --cpu-hidden 32 --cpu-vocab 4000)
    overhead_args=(--backbone test_resnet --image-size 8 --batch-size 64 --epochs 1 --repeats 1
        --cases plain TrainingDynamics)
else
    mode="GPU (Triton kernels compiled for CUDA)"
    results="$out_dir/gpu_check_$stamp.txt"
    # Compiled, not interpreted: TRITON_INTERPRET must be unset for every step.
    unset TRITON_INTERPRET
    export LIGHTNING_NOISE_TEST_DEVICE=cuda
    # Budget (8 minutes on one H100): the venv from the local mirror, then the kernel tests
    # (mostly Triton compiling each kernel variant), then the two benchmarks.
    : "${GPU_CHECK_TIMEOUT_ENV:=200}" "${GPU_CHECK_TIMEOUT_TESTS:=120}"
    : "${GPU_CHECK_TIMEOUT_KERNELS:=100}" "${GPU_CHECK_TIMEOUT_OVERHEAD:=60}"
    tests_args=(tests/kernels)
    # The issue's goal sizes; C=1000 and 20 repeats (the script's defaults) are left out to fit.
    kernels_args=(--rows 8192 --classes 32000 128256 --hidden 2048 --dtype bfloat16 --repeats 10)
    # One epoch per fit, two rotations of the five cases (defaults: 2 epochs, 4 repeats).
    overhead_args=(--epochs 1 --repeats 2)
fi
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
    read -r -a tests_args <<<"$GPU_CHECK_TESTS"
fi

# Each entry: "step<TAB>exit status<TAB>seconds".
summary=()
failed=0

# run_step NAME LIMIT_S CMD...: run CMD under a time limit, its output into the results file
# (and the terminal), and record its exit status; never stops the script.
run_step() {
    local name="$1" limit="$2"
    shift 2
    {
        echo
        echo "== step: $name (limit ${limit} s) =="
        printf '$'
        printf ' %q' "$@"
        echo
    } | tee -a "$results"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$results"
    local status=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    local note=""
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        note=" (timed out)"
    fi
    echo "-- $name: exit status $status$note after ${took} s" | tee -a "$results"
    summary+=("$name	$status$note	$took")
    if [ "$status" != 0 ]; then
        failed=1
    fi
}

{
    echo "# lightning-noise GPU check (benchmarks/gpu_check.sh)"
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "mode: $mode"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        git diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "host: $(uname -srm); nproc $(nproc)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
            --format=csv,noheader 2>&1 | head -n 1)"
    fi
} | tee "$results"

# 1. The environment, by the Makefile's own rule (a no-op when .venv is up to date).
run_step environment "$GPU_CHECK_TIMEOUT_ENV" make .venv/.installed

# 2. The device and versions every figure below belongs to. On the GPU this step fails
# when torch sees no CUDA device (the later steps then fail too, each on its own).
cat >"$scratch/device.py" <<'PY'
import datetime
import platform
import sys

import lightning
import torch

try:
    import triton

    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
if torch.cuda.is_available():
    device = torch.cuda.get_device_name()
else:
    device = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
print("device:", device)
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda})")
print("triton:", triton_version)
print("lightning:", lightning.__version__)
print("python:", sys.version.split()[0])
print("date:", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
if sys.argv[1] == "gpu" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU")
PY
run_step device 60 "$py" "$scratch/device.py" "$([ "$dry_run" = 1 ] && echo cpu || echo gpu)"

# 3. The kernel tests: on the GPU with LIGHTNING_NOISE_TEST_DEVICE=cuda (tests/conftest.py
# then leaves TRITON_INTERPRET unset and tests/kernels/conftest.py moves the inputs to CUDA).
# Autotuning off (LIGHTNING_NOISE_AUTOTUNE=0): the tests' many odd sizes would each be tuned;
# tests/kernels/test_tuning.py switches it on for its own check of the tuned path.
run_step kernel-tests "$GPU_CHECK_TIMEOUT_TESTS" \
    env LIGHTNING_NOISE_AUTOTUNE=0 .venv/bin/pytest -q -p no:cacheprovider "${tests_args[@]}"

# 4. Kernel benchmark (time, peak memory, bandwidth on the GPU; correctness and the head +
# loss's peak memory on the CPU). --no-record: the figures live in this results file.
# Autotuned (the warm-up runs tune); TRITON_PRINT_AUTOTUNING=1 writes each choice here.
run_step kernels-benchmark "$GPU_CHECK_TIMEOUT_KERNELS" \
    env TRITON_PRINT_AUTOTUNING=1 "$py" benchmarks/kernels.py --no-record "${kernels_args[@]}"

# 4b. linear_cross_entropy's two paths (three matrix products with gradients from forward,
# four with the recompute): time and peak memory of each, in one run.
if [ "$dry_run" = 1 ]; then
    lce_args=(--rows 256 --hidden 32 --vocab 4000 --repeats 2)
else
    lce_args=(--device cuda --dtype bfloat16 --rows 8192 --hidden 2048 --vocab 128256 --repeats 5)
fi
run_step linear-ce-paths "${GPU_CHECK_TIMEOUT_LCE:-40}" \
    "$py" benchmarks/linear_ce_paths.py "${lce_args[@]}"

# 5. Each method's cost per optimizer step relative to plain training.
run_step overhead-benchmark "$GPU_CHECK_TIMEOUT_OVERHEAD" \
    "$py" benchmarks/overhead.py --no-record --root "$scratch" "${overhead_args[@]}"

{
    echo
    echo "== summary =="
    printf '%s\t%s\t%s\n' step "exit status" seconds
    printf '%s\n' "${summary[@]}"
    if [ "$failed" = 0 ]; then echo "all steps passed"; else echo "SOME STEPS FAILED"; fi
    echo "results: $results"
} | tee -a "$results"
exit "$failed"
