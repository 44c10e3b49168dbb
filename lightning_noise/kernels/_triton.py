"""Launchers of the Triton kernels in :mod:`lightning_noise.kernels._triton_kernels`.

Kernels are wrapped with ``triton.jit`` at first use and cached per mode (compiled or
interpreted), so ``TRITON_INTERPRET`` may be set any time before the first call. Tile sizes:
on a GPU, blocks of up to 4096 float32 (8192 16-bit) columns and enough rows per program to
fill a tile of about 4096 elements; in the interpreter, which pays per program rather than
per element, tiles of up to 65536 elements.

Triton launches a kernel on the current CUDA device, not on the device of its arguments, so
every launch runs under :func:`on_device` of its input: a tensor on a GPU other than the
current one is then computed on its own GPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from lightning_noise.kernels._dispatch import LAUNCHES, interpreting

__all__ = ["ce_backward", "ce_forward", "on_device", "softmax_backward", "softmax_forward"]


@functools.cache
def _jit(name: str, interpret: bool):  # the mode is only part of the cache key
    import triton

    from lightning_noise.kernels import _triton_kernels

    return triton.jit(getattr(_triton_kernels, name))


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (it makes that GPU current for the
    launch, and restores the previous one after); a context that does nothing elsewhere (the
    CPU, where the interpreter runs)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _kernel(name: str):
    LAUNCHES[name] += 1
    return _jit(name, interpreting())


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tiles(
    n_rows: int, n_cols: int, dtype: torch.dtype, *, interpret: bool | None = None
) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` for a ``[n_rows, n_cols]`` matrix, in the interpreter
    or compiled (``interpret=None``: as :func:`interpreting` says; the benchmark asks for the
    compiled tiles to count the bytes a GPU moves)."""
    if interpreting() if interpret is None else interpret:
        block_c = min(_next_pow2(n_cols), 8192)
        block_r = max(1, min(_next_pow2(n_rows), 65536 // block_c))
        return block_r, block_c, 4
    widest = 8192 if dtype in (torch.float16, torch.bfloat16) else 4096
    block_c = min(_next_pow2(n_cols), widest)
    block_r = max(1, min(_next_pow2(n_rows), 4096 // block_c))
    tile = block_r * block_c
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return block_r, block_c, num_warps


def _grid(n_rows: int, block_r: int) -> tuple[int]:
    return ((n_rows + block_r - 1) // block_r,)


def softmax_forward(x: Tensor) -> Tensor:
    """Row softmax of a ``[n, c]`` matrix with contiguous columns."""
    n, c = x.shape
    y = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    block_r, block_c, warps = _tiles(n, c, x.dtype)
    with on_device(x.device):
        _kernel("softmax_forward")[_grid(n, block_r)](
            x, y, n, c, x.stride(0), y.stride(0), block_r, block_c, block_c >= c, num_warps=warps
        )
    return y


def softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    n, c = y.shape
    dx = torch.empty((n, c), dtype=y.dtype, device=y.device)
    if n == 0:
        return dx
    block_r, block_c, warps = _tiles(n, c, y.dtype)
    with on_device(y.device):
        _kernel("softmax_backward")[_grid(n, block_r)](
            y,
            dy,
            dx,
            n,
            c,
            y.stride(0),
            dy.stride(0),
            dx.stride(0),
            block_r,
            block_c,
            block_c >= c,
            num_warps=warps,
        )
    return dx


def ce_forward(
    x: Tensor, target: Tensor, ignore_index: int, eps: float, alpha: float, zl: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)`` of a ``[n, c]`` logit matrix (float32, float32, int32).

    The arg-max is computed only for MaxSup (``alpha > 0``), the row sum only for it or label
    smoothing: without them the kernel is compiled without either (its arg-max output is 0).
    """
    n, c = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    amax = torch.empty(n, dtype=torch.int32, device=x.device)
    if n == 0:
        return loss, lse, amax
    block_r, block_c, warps = _tiles(n, c, x.dtype)
    with on_device(x.device):
        _kernel("ce_forward")[_grid(n, block_r)](
            x,
            target,
            loss,
            lse,
            amax,
            n,
            c,
            x.stride(0),
            ignore_index,
            eps,
            alpha,
            zl,
            block_r,
            block_c,
            eps > 0.0 or alpha > 0.0,
            alpha > 0.0,
            num_warps=warps,
        )
    return loss, lse, amax


def ce_backward(
    x: Tensor,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    out: Tensor | None = None,
) -> Tensor:
    """Gradient of ``sum_i grad_rows[i] * loss_i`` with respect to ``x``, written to ``out``
    (a new tensor like ``x`` by default; ``out`` may be ``x`` itself)."""
    n, c = x.shape
    dx = torch.empty((n, c), dtype=x.dtype, device=x.device) if out is None else out
    if n == 0:
        return dx
    block_r, block_c, warps = _tiles(n, c, x.dtype)
    with on_device(x.device):
        _kernel("ce_backward")[_grid(n, block_r)](
            x,
            target,
            lse,
            amax,
            grad_rows,
            dx,
            n,
            c,
            x.stride(0),
            dx.stride(0),
            ignore_index,
            eps,
            alpha,
            zl,
            block_r,
            block_c,
            alpha > 0.0,
            num_warps=warps,
        )
    return dx
