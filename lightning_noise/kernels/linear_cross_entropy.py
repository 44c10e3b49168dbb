"""The classifier head and the fused cross-entropy together, without the ``N x V`` logits.

The idea of Cut Cross-Entropy (Wijmans et al., ICLR 2025, "Cut Your Losses in Large-
Vocabulary Language Models"): the loss needs only ``lse`` and a few numbers per row, so the
logits can be produced a chunk of rows at a time and dropped. Forward: for each chunk of rows,
``logits = hidden @ weight.T + bias`` (a ``[rows, V]`` buffer), then the fused cross-entropy's
per-row forward; only ``lse``, the arg-max and the loss are kept. Backward: for each chunk,
the logits are recomputed, their gradient is written over them in place, and
``grad_hidden[chunk] = g @ weight``, ``grad_weight += g.T @ hidden[chunk]``,
``grad_bias += g.sum(0)``. The peak extra memory is one chunk of logits; the cost is one
more ``hidden @ weight.T`` than the naive head.

By default a chunk holds ``ceil(N * H / V)`` rows (at least 1), so a chunk of logits is no
larger than ``hidden`` itself (the chunking rule of Liger Kernel's fused linear
cross-entropy). ``grad_weight`` accumulates across chunks in ``weight``'s dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_noise.kernels._autograd import differentiable_once
from lightning_noise.kernels._checks import check_target
from lightning_noise.kernels._dispatch import resolve_impl
from lightning_noise.kernels.cross_entropy import (
    check_options,
    reduce_rows,
    rows_backward,
    rows_forward,
)

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row fused loss of ``hidden [n, h] @ weight [v, h].T + bias`` against ``[n]``."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        chunk: int,
        options: tuple[int, float, float, float, str],
    ) -> Tensor:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss)
        amax = torch.empty(n, dtype=torch.int32, device=hidden.device)
        for lo, hi in _chunks(n, chunk):
            logits = _logits(hidden[lo:hi], weight, bias)
            loss[lo:hi], lse[lo:hi], amax[lo:hi] = rows_forward(logits, target[lo:hi], *options)
            del logits
        ctx.save_for_backward(hidden, weight, bias, target, lse, amax)
        ctx.chunk, ctx.options = chunk, options
        ctx.mark_non_differentiable(lse, amax)
        return loss

    @staticmethod
    @differentiable_once(
        "linear_cross_entropy",
        "torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target)",
    )
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, target, lse, amax = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_loss = grad_loss.contiguous()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        for lo, hi in _chunks(hidden.shape[0], ctx.chunk):
            logits = _logits(hidden[lo:hi], weight, bias)
            g = rows_backward(
                logits,
                target[lo:hi],
                lse[lo:hi],
                amax[lo:hi],
                grad_loss[lo:hi],
                *ctx.options,
                out=logits,  # the chunk's gradient replaces its logits: no second buffer
            )
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[lo:hi])
            if grad_w is not None:
                grad_w.addmm_(g.t(), hidden[lo:hi])
            if grad_b is not None:
                grad_b += g.sum(dim=0).to(grad_b.dtype)
            del logits, g
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    maxsup_alpha: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without storing those logits.

    Args:
        hidden: ``[N, H]`` or ``[N, ..., H]`` features, float32, bfloat16 or float16.
        weight: ``[V, H]`` classifier weight (an ``nn.Linear``'s ``weight``).
        target: Class indices of shape ``hidden.shape[:-1]``.
        bias: Optional ``[V]`` bias.
        ignore_index, label_smoothing, maxsup_alpha, z_loss, reduction, impl: As in
            :func:`~lightning_noise.kernels.cross_entropy`.
        chunk_size: Rows per chunk; ``None`` chooses ``ceil(N * H / V)``.

    Returns:
        The loss in float32.

    Example:
        >>> h, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, 4, 5, 6])
        >>> a = linear_cross_entropy(h, w, y, chunk_size=2, impl="torch")
        >>> bool(torch.isclose(a, torch.nn.functional.cross_entropy(h @ w.T, y)))
        True
    """
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("hidden and weight must be tensors")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, ..., H] and weight [V, H] with the same H; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and bias must be on one device"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight has no classes: its shape is {tuple(weight.shape)} (V = 0)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a dtype; "
            "cast them (or run under autocast, which casts before the call)"
        )
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    vocab = weight.shape[0]
    check_target(target, hidden.shape[:-1], vocab, ignore_index, hidden.device)
    eps, alpha, zl, reduction = check_options(label_smoothing, maxsup_alpha, z_loss, reduction)
    rows = hidden.reshape(hidden.shape[:-1].numel(), hidden.shape[-1])
    flat_target = target.reshape(-1).contiguous()
    n = rows.shape[0]
    if chunk_size is None:
        chunk_size = max(1, math.ceil(n * rows.shape[1] / vocab))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    chosen = resolve_impl(impl, hidden)
    options = (int(ignore_index), eps, alpha, zl, chosen)
    loss = LinearCrossEntropyFunction.apply(
        rows, weight, bias, flat_target, max(1, chunk_size), options
    )
    return reduce_rows(loss, flat_target, ignore_index, reduction, target.shape)
