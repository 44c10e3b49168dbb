"""Fused cross-entropy with label smoothing, MaxSup and z-loss: one read of the logits forward,
the logits' gradient and nothing else ``N x C`` backward.

Per row ``i`` with logits ``x``, target ``y``, ``lse = logsumexp(x)``, ``C`` classes::

    loss_i = (1 - eps) * (lse - x_y)                  # cross-entropy, weight 1 - eps
             + eps * (lse - mean_k x_k)               # label smoothing (Szegedy et al. 2016)
             + alpha * (max_k x_k - mean_k x_k)       # MaxSup (Zhou et al. 2025)
             + z * lse ** 2                           # z-loss (PaLM, Chowdhery et al. 2022)

which equals ``F.cross_entropy(x, y, label_smoothing=eps)`` when ``alpha = z = 0``, and our
:func:`~lightning_noise.losses.maxsup_cross_entropy` when ``eps = 0``. The forward pass keeps
three numbers per row (``lse``, the arg-max, the loss); the backward pass recomputes the
softmax from the logits and ``lse`` and writes the gradient (see
:mod:`lightning_noise.kernels._triton_kernels` for the formula). Unlike Liger Kernel, the
logits are never overwritten: they stay usable after the loss (metrics, a second SAM pass).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_noise.kernels import _triton
from lightning_noise.kernels._autograd import differentiable_once
from lightning_noise.kernels._checks import check_logits_target, check_number, check_reduction
from lightning_noise.kernels._dispatch import resolve_impl

__all__ = [
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "rows_backward",
    "rows_forward",
]

#: Rows per chunk of the PyTorch path: bounds its float32 temporaries to ~2**24 elements.
_TORCH_CHUNK_ELEMENTS = 1 << 24


def _torch_chunks(n_rows: int, n_cols: int) -> range:
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    return range(0, n_rows, step)


def _torch_forward(
    x: Tensor, target: Tensor, ignore_index: int, eps: float, alpha: float, zl: float
) -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss)
    amax = torch.empty(n, dtype=torch.int32, device=x.device)
    step = _torch_chunks(n, c).step
    for lo in _torch_chunks(n, c):
        xc = x[lo : lo + step].float()
        t = target[lo : lo + step]
        valid = t != ignore_index
        m, arg = xc.max(dim=1)
        log_d = (xc - m[:, None]).exp().sum(dim=1).log()
        x_y = xc.gather(1, torch.where(valid, t, 0).long()[:, None]).squeeze(1)
        mean = xc.mean(dim=1)
        # A term whose weight is 0 is left out, not multiplied by 0: with a -inf logit (mean
        # -inf) or an lse that overflows, 0 * inf would make a finite or +inf loss NaN.
        row = (1 - eps) * (m - x_y)
        if eps:
            row = row + eps * (m - mean)
        row = row + log_d
        if alpha:
            row = row + alpha * (m - mean)
        if zl:
            row = row + zl * (m + log_d) ** 2
        loss[lo : lo + step] = torch.where(valid, row, 0.0)
        lse[lo : lo + step] = m + log_d
        amax[lo : lo + step] = arg.int()
    return loss, lse, amax


def _torch_backward(
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
    n, c = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    step = _torch_chunks(n, c).step
    for lo in _torch_chunks(n, c):
        xc = x[lo : lo + step].float()
        t = target[lo : lo + step]
        valid = t != ignore_index
        rows = torch.arange(xc.shape[0], device=x.device)
        grad = (xc - lse[lo : lo + step, None]).exp() * (1 + 2 * zl * lse[lo : lo + step, None])
        grad -= (eps + alpha) / c
        grad[rows, amax[lo : lo + step].long()] += alpha
        grad[rows, torch.where(valid, t, 0).long()] -= torch.where(valid, 1 - eps, 0.0)
        grad *= torch.where(valid, grad_rows[lo : lo + step].float(), 0.0)[:, None]
        dx[lo : lo + step] = grad.to(dx.dtype)
    return dx


def rows_forward(
    x: Tensor, target: Tensor, ignore_index: int, eps: float, alpha: float, zl: float, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)`` of a ``[n, c]`` logit matrix with contiguous columns,
    by the resolved ``impl`` (``"triton"`` or ``"torch"``); ignored rows have loss 0."""
    forward = _triton.ce_forward if impl == "triton" else _torch_forward
    return forward(x, target, ignore_index, eps, alpha, zl)


def rows_backward(
    x: Tensor,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    out: Tensor | None = None,
) -> Tensor:
    """Gradient of ``sum_i grad_rows[i] * loss_i`` with respect to ``x`` (into ``out`` if given,
    which may be ``x`` itself)."""
    backward = _triton.ce_backward if impl == "triton" else _torch_backward
    return backward(x, target, lse, amax, grad_rows, ignore_index, eps, alpha, zl, out=out)


# The per-row loss is a custom operator (``torch.library.custom_op``) rather than an
# ``autograd.Function``: ``torch.compile`` then puts one opaque call in its graph (no graph
# break, the logits never re-materialised by a decomposition), its fake kernel gives the
# outputs' shapes for tracing, and the backward below is traced into the compiled backward.
@torch.library.custom_op("lightning_noise::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)`` of ``[n, c]`` logits (columns contiguous) and ``[n]``
    targets, by ``impl`` (``"triton"`` or ``"torch"``, already resolved). Differentiable with
    respect to ``logits`` (once: see :mod:`lightning_noise.kernels._autograd`)."""
    return rows_forward(logits, target, ignore_index, eps, alpha, zl, impl)


@cross_entropy_forward.register_fake
def _cross_entropy_forward_fake(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    n = logits.shape[0]
    loss = logits.new_empty(n, dtype=torch.float32)
    return loss, torch.empty_like(loss), logits.new_empty(n, dtype=torch.int32)


@torch.library.custom_op("lightning_noise::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
) -> Tensor:
    """The logits' gradient of ``sum_i grad_rows[i] * loss_i`` (a new contiguous tensor)."""
    return rows_backward(
        logits, target, lse, amax, grad_rows.contiguous(), ignore_index, eps, alpha, zl, impl
    )


@cross_entropy_backward.register_fake
def _cross_entropy_backward_fake(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    logits, target, ignore_index, eps, alpha, zl, impl = inputs
    _, lse, amax = output
    ctx.save_for_backward(logits, target, lse, amax)
    ctx.options = (ignore_index, eps, alpha, zl, impl)
    ctx.mark_non_differentiable(lse, amax)


@differentiable_once("cross_entropy", "torch.nn.functional.cross_entropy")
def _backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    logits, target, lse, amax = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = cross_entropy_backward(logits, target, lse, amax, grad_loss, *ctx.options)
    return grad, None, None, None, None, None, None


cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def check_options(
    label_smoothing: float, maxsup_alpha: float, z_loss: float, reduction: str
) -> tuple[float, float, float, str]:
    """The fused options, checked: ``(eps, alpha, z, reduction)``."""
    return (
        check_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        check_number("maxsup_alpha", maxsup_alpha, low=0.0),
        check_number("z_loss", z_loss, low=0.0),
        check_reduction(reduction),
    )


def reduce_rows(
    loss: Tensor, target: Tensor, ignore_index: int, reduction: str, shape: torch.Size
) -> Tensor:
    """Reduce per-row losses (0 where ignored): ``"none"`` reshaped to ``shape``, ``"sum"``,
    or ``"mean"`` over the rows not ignored (0 when all are)."""
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp_min(1)


def _as_rows(logits: Tensor) -> Tensor:
    """``[M, C]`` view of classes-last ``logits`` (a copy only when the classes are strided)."""
    rows = logits.reshape(logits.shape[:-1].numel(), logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    maxsup_alpha: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """Fused cross-entropy of classes-last ``logits`` (see the module docstring).

    Args:
        logits: ``[N, C]`` or ``[N, ..., C]``, float32, bfloat16 or float16, any strides.
        target: Class indices of shape ``logits.shape[:-1]``; ``ignore_index`` entries count
            for nothing.
        label_smoothing: ``eps`` in ``[0, 1]`` (PyTorch's semantics).
        maxsup_alpha: MaxSup's weight ``alpha`` >= 0 on ``max x - mean x``.
        z_loss: Weight >= 0 of ``logsumexp(x) ** 2``.
        reduction: ``"none"`` (the loss per entry, 0 where ignored), ``"sum"`` or ``"mean"``
            over the entries not ignored (0 when all are ignored, where PyTorch gives NaN).
        impl: ``"auto"``, ``"triton"`` or ``"torch"`` (:mod:`lightning_noise.kernels`).

    Returns:
        The loss in float32 (computed in float32 for every input type).

    Example:
        >>> import torch.nn.functional as F
        >>> x, y = torch.randn(4, 7), torch.tensor([0, 3, 6, 2])
        >>> a = cross_entropy(x, y, label_smoothing=0.1, impl="torch")
        >>> bool(torch.isclose(a, F.cross_entropy(x, y, label_smoothing=0.1)))
        True
    """
    check_logits_target(logits, target, ignore_index)
    eps, alpha, zl, reduction = check_options(label_smoothing, maxsup_alpha, z_loss, reduction)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    chosen = resolve_impl(impl, logits)
    flat_target = target.reshape(-1)
    if chosen == "triton":
        flat_target = flat_target.contiguous()
    loss, _, _ = cross_entropy_forward(
        _as_rows(logits), flat_target, int(ignore_index), eps, alpha, zl, chosen
    )
    return reduce_rows(loss, flat_target, ignore_index, reduction, target.shape)
