"""Time ``linear_cross_entropy``'s two paths: gradients in forward (three matrix products per
chunk) against recompute in backward (four), forward + backward, in one run.

Each repeat runs both paths on the same inputs, alternating which goes first, from cleared
gradients; the script prints each path's median time, the ratio three/four, and on CUDA each
path's peak memory above the inputs and their gradients. On the CPU (the default) it runs the
PyTorch path (``impl="torch"``); on CUDA the Triton kernels.

    python benchmarks/linear_ce_paths.py                      # N=4096 H=256 V=32000 float32
    python benchmarks/linear_ce_paths.py --device cuda --dtype bfloat16 --rows 8192 \\
        --hidden 2048 --vocab 128256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_noise.kernels import linear_cross_entropy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    impl = "torch" if device.type == "cpu" else "triton"
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.rows, args.hidden, generator=gen, device=device).to(dtype)
    w = torch.randn(args.vocab, args.hidden, generator=gen, device=device) * 0.02
    y = torch.randint(0, args.vocab, (args.rows,), generator=gen, device=device)
    h, w = h.requires_grad_(), w.to(dtype).requires_grad_()
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    paths = {"three products (recompute=False)": False, "four products (recompute=True)": True}
    times: dict[str, list[float]] = {name: [] for name in paths}
    peaks: dict[str, float] = {}

    def run(recompute: bool) -> float:
        h.grad.zero_()
        w.grad.zero_()
        _sync(device)
        start = time.perf_counter()
        linear_cross_entropy(h, w, y, impl=impl, recompute=recompute).backward()
        _sync(device)
        return time.perf_counter() - start

    for recompute in paths.values():  # warm-up: first-call imports, kernel compilation
        run(recompute)
    for name, recompute in paths.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run(recompute)
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    order = list(paths.items())
    for i in range(args.repeats):
        for name, recompute in order if i % 2 == 0 else order[::-1]:
            times[name].append(run(recompute))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"linear_cross_entropy N={args.rows} H={args.hidden} V={args.vocab} {args.dtype} "
        f"impl={impl} on {where}, {torch.get_num_threads()} CPU threads, "
        f"median of {args.repeats} forward + backward"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        line = f"  {name}: median {medians[name] * 1e3:.1f} ms (all: "
        line += ", ".join(f"{x * 1e3:.0f}" for x in t) + ")"
        if name in peaks:
            line += f", peak {peaks[name]:.0f} MiB above inputs and gradients"
        print(line)
    three, four = medians.values()
    print(f"  ratio three / four: {three / four:.3f}")
    return {"three_s": three, "four_s": four, "ratio": three / four}


if __name__ == "__main__":
    main()
