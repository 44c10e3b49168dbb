"""The fused kernels against PyTorch: time, peak memory and bandwidth (GPU); correctness and
the memory of ``linear_cross_entropy`` (CPU).

On a CUDA GPU, for N = 8192 rows and C in {1000, 32000, 128256} (bfloat16 by default), it
times forward + backward of

* cross-entropy: ours (Triton), PyTorch eager ``F.cross_entropy``, ``torch.compile`` of it,
  and Liger Kernel's ``LigerCrossEntropyLoss`` when ``liger_kernel`` is installed;
* softmax: ours against ``torch.softmax`` (eager and compiled);
* the head + loss at C = V: ``linear_cross_entropy`` against ``F.cross_entropy(h @ W.T)``,

and prints each one's median time, peak memory above the inputs, and the achieved bandwidth
as a fraction of the device's copy bandwidth measured in the same run (``clone`` of a 1 GiB
tensor: 2 bytes moved per byte). Each timed run starts with the inputs' ``.grad`` cleared
(outside the timing), so every backward writes one fresh gradient rather than adding into the
last one. The bytes counted for cross-entropy are the logits read once forward and once
backward and their gradient written (3 N C elements), which is what our kernels move and the
least any implementation must move (Liger Kernel also moves 3: two reads and an in-place write,
all in forward). For softmax, ours counts what our kernels move: 5 N C when a row fits in one
block (x read and y written forward; y and dy read and dx written backward), 8 N C when it
does not (x read twice forward, y and dy read twice backward); the other providers are
counted at the least, 5 N C.

On the CPU (no GPU): the kernels' PyTorch path is checked against PyTorch on a few shapes (and
the Triton path too when ``TRITON_INTERPRET=1``), and the peak memory of forward + backward of
``linear_cross_entropy`` is compared with the naive head + loss, each measured in a fresh
(Linux) process as its peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``
once the inputs and their gradients exist) above the resident memory at that point.

Run: ``python benchmarks/kernels.py`` (``--help`` for sizes). Results are appended to
``benchmarks/results.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from common import append_results, device_name

from lightning_noise.kernels import _triton, cross_entropy, linear_cross_entropy, softmax

GiB = 1 << 30


# ------------------------------------------------------------------------------- GPU side


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], repeats: int, reset: Callable[[], None]) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after 3 warm-ups (CUDA events on a GPU,
    the wall clock elsewhere). ``reset`` runs before every run, outside the timed region: it
    clears the inputs' ``.grad``, so that no run adds its gradient into the last one's."""
    for _ in range(3):
        reset()
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        reset()
        if torch.cuda.is_available():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def _peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(repeats: int) -> float:
    x = torch.empty(GiB // 4, dtype=torch.float32, device="cuda")
    seconds = _time(lambda: x.clone(), repeats, reset=lambda: None)
    return 2 * x.numel() * 4 / seconds


def _liger() -> type[torch.nn.Module] | None:
    """Liger Kernel's public cross-entropy module class, or ``None`` when it is not installed.
    The module calls ``LigerCrossEntropyFunction.apply`` with the arguments of its own version
    (that function's positional arguments changed across releases; it now takes ``weight``
    third)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss


HEADER = f"{'case':<34}{'ms':>9}{'peak MiB':>10}{'of copy bw':>11}{'vs eager':>9}"


def _report(
    providers: dict[str, Callable[[], object]],
    *,
    nbytes: dict[str, int],
    bw: float,
    case: str,
    repeats: int,
    reset: Callable[[], None],
) -> list[tuple[str, str, float]]:
    """Time and peak memory of each provider; the first one named "torch eager" is 1x.
    ``nbytes`` gives each provider's bytes moved (see the module docstring)."""
    rows: list[tuple[str, str, float]] = []
    eager_ms = None
    for name, fn in providers.items():
        seconds = _time(fn, repeats, reset)
        reset()
        peak = _peak(fn)
        reset()
        eager_ms = seconds * 1e3 if name == "torch eager" else eager_ms
        frac = nbytes[name] / seconds / bw
        ratio = "" if eager_ms is None else f"{eager_ms / (seconds * 1e3):>8.2f}x"
        print(f"{name:<34}{seconds * 1e3:>9.3f}{peak / 2**20:>10.0f}{frac:>11.2f}{ratio}")
        rows += [
            (f"{case}/{name}", "ms", seconds * 1e3),
            (f"{case}/{name}", "peak_MiB", peak / 2**20),
        ]
        rows.append((f"{case}/{name}", "bandwidth_fraction", frac))
    return rows


def softmax_bytes(n: int, c: int, dtype: torch.dtype) -> int:
    """Bytes our softmax kernels move, forward + backward, for ``[n, c]`` on a GPU: 5 n c
    elements when a row fits in one block of columns, 8 n c when it does not (the forward
    reads x twice, the backward reads y and dy twice). The block is the one the autotuner
    chose for this ``c`` and dtype (run the kernel first), else the fixed heuristic's."""
    chosen = _triton.chosen_config("softmax_forward", n_cols=c, dtype=dtype)
    if chosen is not None:
        block_c = chosen["BLOCK_C"]
    else:
        _, block_c, _ = _triton._tiles(n, c, dtype, interpret=False)
    return (5 if block_c >= c else 8) * n * c * dtype.itemsize


def loss_providers(
    x: torch.Tensor, y: torch.Tensor, compiled: dict[str, Callable]
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]], Callable]:
    """The cross-entropy and softmax providers on the logits ``x``, and the ``reset`` that
    clears every input's ``.grad`` (and restores Liger's copy of the logits) between runs."""
    dy = torch.randn_like(x)
    losses: dict[str, Callable[[], object]] = {
        "ours": lambda: cross_entropy(x, y, impl="triton").backward(),
        "torch eager": lambda: F.cross_entropy(x, y).backward(),
        "torch.compile": lambda: compiled["ce"](x, y).backward(),
    }
    softmaxes: dict[str, Callable[[], object]] = {
        "ours": lambda: softmax(x, impl="triton").backward(dy),
        "torch eager": lambda: torch.softmax(x, -1).backward(dy),
        "torch.compile": lambda: compiled["softmax"](x, -1).backward(dy),
    }
    inputs = [x]
    liger = _liger()
    if liger is not None:
        # Liger writes the gradient into its input in place: it gets its own copy of the
        # logits, restored before every run, so that it always reads logits and cannot
        # corrupt the other providers' input.
        x_liger = x.detach().clone().requires_grad_()
        liger_loss = liger()
        losses["liger"] = lambda: liger_loss(x_liger, y).backward()
        inputs.append(x_liger)

    def reset() -> None:
        for t in inputs:
            t.grad = None
        if liger is not None:
            with torch.no_grad():
                x_liger.copy_(x)

    return losses, softmaxes, reset


def _bench_losses(x: torch.Tensor, y: torch.Tensor, args, bw: float, compiled) -> list:
    n, c = x.shape
    elem = x.element_size()
    losses, softmaxes, reset = loss_providers(x, y, compiled)
    print(f"\ncross-entropy N={n} C={c}\n{HEADER}")
    case = f"cross_entropy/N{n}/C{c}/{args.dtype}"
    nbytes = dict.fromkeys(losses, 3 * n * c * elem)
    rows = _report(losses, nbytes=nbytes, bw=bw, case=case, repeats=args.repeats, reset=reset)
    print(f"\nsoftmax N={n} C={c}\n{HEADER}")
    case = f"softmax/N{n}/C{c}/{args.dtype}"
    nbytes = dict.fromkeys(softmaxes, 5 * n * c * elem)
    softmaxes["ours"]()  # the autotuner's choice for this C, before its bytes are counted
    reset()
    nbytes["ours"] = softmax_bytes(n, c, x.dtype)
    rows += _report(softmaxes, nbytes=nbytes, bw=bw, case=case, repeats=args.repeats, reset=reset)
    for kernel in ("ce_forward", "ce_backward", "softmax_forward", "softmax_backward"):
        print(f"{kernel} at C={c}: {_triton.chosen_config(kernel, n_cols=c, dtype=x.dtype)}")
    return rows


def head_providers(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """The head + loss providers and the ``reset`` that clears ``h.grad`` and ``w.grad``."""

    def reset() -> None:
        h.grad = w.grad = None

    providers = {
        "linear_cross_entropy": lambda: linear_cross_entropy(h, w, y, impl="triton").backward(),
        "naive head + F.cross_entropy": lambda: F.cross_entropy(h @ w.T, y).backward(),
    }
    return providers, reset


def _bench_head(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, args, bw: float) -> list:
    n, hdim = h.shape
    vocab = w.shape[0]
    providers, reset = head_providers(h, w, y)
    print(f"\nhead + loss N={n} H={hdim} V={vocab} (bandwidth column: logits-sized traffic)")
    print(HEADER)
    case = f"linear_cross_entropy/N{n}/H{hdim}/V{vocab}/{args.dtype}"
    rows = _report(
        providers,
        nbytes=dict.fromkeys(providers, 3 * n * vocab * h.element_size()),
        bw=bw,
        case=case,
        repeats=max(3, args.repeats // 4),
        reset=reset,
    )
    peaks = {r[0].rsplit("/", 1)[1]: r[2] for r in rows if r[1] == "peak_MiB"}
    ratio = peaks["linear_cross_entropy"] / peaks["naive head + F.cross_entropy"]
    print(f"peak memory, ours / naive: {ratio:.3f}")
    return [*rows, (case, "peak_ratio", ratio)]


def gpu(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(args.repeats)
    print(f"device: {device_name()}; copy bandwidth {bw / 1e9:.0f} GB/s; dtype {args.dtype}")
    print("liger_kernel:", "installed" if _liger() is not None else "not installed")
    rows: list[tuple[str, str, float]] = [("copy", "bandwidth_GBps", bw / 1e9)]
    compiled = {"ce": torch.compile(F.cross_entropy), "softmax": torch.compile(torch.softmax)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = args.rows
    for c in args.classes:
        x = torch.randn(n, c, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        y = torch.randint(0, c, (n,), device="cuda", generator=gen)
        rows += _bench_losses(x, y, args, bw, compiled)
    for c in args.classes:
        h = torch.randn(n, args.hidden, device="cuda", dtype=dtype, generator=gen)
        w = torch.randn(c, args.hidden, device="cuda", dtype=dtype, generator=gen) * 0.02
        y = torch.randint(0, c, (n,), device="cuda", generator=gen)
        rows += _bench_head(h.requires_grad_(), w.requires_grad_(), y, args, bw)
    return rows


# ------------------------------------------------------------------------------- CPU side


def check_correctness() -> list[tuple[str, str, float]]:
    """Largest differences from PyTorch (value and gradient) on a few shapes."""
    impls = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    rows = []
    for impl in impls:
        for n, c in ((1823, 781), (16, 50257)):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, generator=gen).requires_grad_()
            y = torch.randint(0, c, (n,), generator=gen)
            loss = cross_entropy(x, y, label_smoothing=0.1, impl=impl)
            (gx,) = torch.autograd.grad(loss, x)
            want = F.cross_entropy(x, y, label_smoothing=0.1)
            (gw,) = torch.autograd.grad(want, x)
            s = softmax(x, impl=impl)
            dv = max((loss - want).abs().item(), (s - torch.softmax(x, -1)).abs().max().item())
            dg = (gx - gw).abs().max().item()
            print(f"{impl:<7} N={n:<5} C={c:<6} max |value diff| {dv:.2e}  |grad diff| {dg:.2e}")
            rows += [(f"correctness/{impl}/N{n}/C{c}", "max_abs_diff", max(dv, dg))]
    return rows


_MEMORY_CHILD = r"""
import json, sys, torch, torch.nn.functional as F
from lightning_noise.kernels import linear_cross_entropy
n, h, v, which = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
hid = torch.randn(n, h).requires_grad_()
w = (torch.randn(v, h) * 0.02).requires_grad_()
y = torch.randint(0, v, (n,))
# Gradients of the inputs are part of both methods' cost: allocate them before the baseline.
hid.grad, w.grad = torch.zeros_like(hid), torch.zeros_like(w)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # kB
def run(hid, w, y):
    if which == "ours":
        linear_cross_entropy(hid, w, y, impl="torch").backward()
    else:
        F.cross_entropy(hid @ w.T, y).backward()
# A first call on 2 rows outside the measurement: a custom operator's first call imports
# torch's compiler modules (torch._dynamo, sympy: ~160 MiB of code, once per process).
run(hid[:2].detach().requires_grad_(), w.detach()[:3].requires_grad_(), y[:2] % 3)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
run(hid, w, y)
peak = status("VmHWM:")
print(json.dumps({"extra_MiB": (peak - base) / 1024}))
"""


def cpu_memory(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    n, hdim, vocab = args.cpu_rows, args.cpu_hidden, args.cpu_vocab
    extra = {}
    for which in ("ours", "naive"):
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(n), str(hdim), str(vocab), which],
            capture_output=True,
            text=True,
            check=True,
        )
        extra[which] = json.loads(done.stdout.strip().splitlines()[-1])["extra_MiB"]
    logits_mib = n * vocab * 4 / 2**20
    ratio = extra["ours"] / extra["naive"]
    print(
        f"\nlinear_cross_entropy N={n} H={hdim} V={vocab} float32 on the CPU (logits would be "
        f"{logits_mib:.0f} MiB): peak extra memory ours {extra['ours']:.0f} MiB, naive head + "
        f"loss {extra['naive']:.0f} MiB, ratio {ratio:.3f}"
    )
    case = f"linear_cross_entropy/N{n}/H{hdim}/V{vocab}/float32"
    return [
        (f"{case}/ours", "peak_extra_MiB", extra["ours"]),
        (f"{case}/naive", "peak_extra_MiB", extra["naive"]),
        (case, "peak_ratio", ratio),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--classes", type=int, nargs="*", default=[1000, 32000, 128256])
    parser.add_argument("--hidden", type=int, default=2048, help="H of the head (GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-rows", type=int, default=4096)
    parser.add_argument("--cpu-hidden", type=int, default=256)
    parser.add_argument("--cpu-vocab", type=int, default=32000)
    parser.add_argument("--no-record", action="store_true", help="do not append to results.csv")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    args = parse_args(argv)
    if torch.cuda.is_available():
        rows = gpu(args)
    else:
        print(f"device: {device_name()} (no GPU: correctness and memory only)")
        rows = check_correctness() + cpu_memory(args)
    if not args.no_record:
        append_results("kernels", rows)
    return rows


if __name__ == "__main__":
    main()
