"""``benchmarks/gpu_check.sh`` (issue 14), run here in its ``--dry-run-cpu`` mode: the same
steps as on a GPU, on CPU tensors (Triton's interpreter, tiny sizes). The GPU mode itself needs
a CUDA machine and is not run by the suite."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = (
    "environment",
    "device",
    "kernel-tests",
    "kernels-benchmark",
    "linear-ce-paths",
    "overhead-benchmark",
)


def dry_run(out: Path, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the dry run into ``out``; return the process and its one results file's text."""
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run-cpu", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    (results,) = out.iterdir()
    assert results.name.startswith("cpu_dry_run_") and results.suffix == ".txt"
    return done, results.read_text()


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_one_results_file(tmp_path) -> None:
    """Slow: 1.5 to 3 minutes on 2 shared CPU cores (the overhead benchmark's three small
    fits, a few interpreted kernel tests, the kernel benchmark's CPU checks). Every step passes,
    and the results file holds the device, the versions, the date and each step's figures."""
    done, text = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in STEPS:
        assert f"-- {step}: exit status 0 after" in text
    for line in ("device: cpu", "torch: ", "triton: ", "date: ", "all steps passed"):
        assert line in text
    assert "passed" in text and "max |value diff|" in text  # the tests' and the benchmark's
    assert "TrainingDynamics" in text and "ratio" in text  # the overhead table


def test_a_failed_step_is_recorded_and_the_next_steps_still_run(tmp_path) -> None:
    """A kernel test that does not exist (pytest exits 4) and three benchmarks cut off at 1 s:
    each status is recorded, every step runs, and the script exits non-zero."""
    done, text = dry_run(
        tmp_path,
        GPU_CHECK_TESTS="tests/kernels/test_no_such_file.py",
        GPU_CHECK_TIMEOUT_KERNELS="1",
        GPU_CHECK_TIMEOUT_LCE="1",
        GPU_CHECK_TIMEOUT_OVERHEAD="1",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "-- environment: exit status 0 after" in text
    assert "-- device: exit status 0 after" in text
    assert "-- kernel-tests: exit status 4 after" in text
    assert "-- kernels-benchmark: exit status 124 (timed out) after" in text
    assert "-- linear-ce-paths: exit status 124 (timed out) after" in text
    assert "-- overhead-benchmark: exit status 124 (timed out) after" in text
    assert "SOME STEPS FAILED" in text
