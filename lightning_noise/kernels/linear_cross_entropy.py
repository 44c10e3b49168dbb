"""The classifier head and the fused cross-entropy together, without the ``N x V`` logits.

The idea of Cut Cross-Entropy (Wijmans et al., ICLR 2025, "Cut Your Losses in Large-
Vocabulary Language Models"): the loss needs only ``lse`` and a few numbers per row, so the
logits can be produced a chunk of rows at a time and dropped. Two paths, chosen by the
``recompute`` argument of :func:`linear_cross_entropy`:

* **Gradients in forward, three matrix products per chunk** (the default when the loss is
  reduced, ``"mean"`` or ``"sum"``, and a gradient of ``hidden``, ``weight`` or ``bias`` will
  be needed; the way of Liger Kernel's fused linear cross-entropy). For each chunk of rows the
  forward computes ``logits = hidden @ weight.T + bias`` (1), the fused cross-entropy's
  per-row loss and, at once, the logits' gradient ``g`` written over the logits in place
  (each row weighted by the reduction's ``d loss / d loss_i``: 1 for ``"sum"``, one over the
  count of rows not ignored for ``"mean"``, that count a device tensor, never read on the
  host; ignored rows get 0), then ``grad_hidden[chunk] = g @ weight`` (2),
  ``grad_weight += g.T @ hidden[chunk]`` (3) and ``grad_bias += g.sum(0)``. The backward only
  multiplies the stored gradients by the incoming scalar gradient.
* **Recompute, four products per chunk** (``recompute=True``; always for
  ``reduction="none"``, whose per-row incoming gradient is not known in forward, and for calls
  with no gradient to come). The forward keeps only ``lse``, the arg-max and the loss per row;
  the backward recomputes each chunk's logits and then proceeds as above. One more
  ``hidden @ weight.T`` than the naive head.

Memory, the trade-off between the two. Both have one chunk of logits as their peak extra
memory while they run. From forward to backward the recompute path holds the inputs (saved
as references, not copies) and three numbers per row. The three-product path holds the
gradients from forward to backward instead: ``grad_hidden`` ``[N, H]`` in hidden's dtype,
``grad_weight`` ``[V, H]`` and ``grad_bias`` ``[V]`` in float32 (and references to the
inputs, so that a second derivative is refused clearly). The recompute path allocates the
same buffers in its backward anyway, so the three-product path's peak is no higher when the
loss is the last thing computed before backward, as it is in a training step; what grows is
the time they are held: between the loss and its backward, say a second loss's forward, they
add ``N * H`` elements of hidden's dtype and ``V * H + V`` float32 (for V = 128256 and
H = 4096, about 2 GiB). The backward scales them in place (a compiled backward, out of place), so
it adds no second ``[V, H]`` buffer; in return it can run only once per forward: a second
backward through the same loss (``retain_graph=True``) raises an error naming
``recompute=True``, which allows it.

By default a chunk holds ``ceil(N * H / V)`` rows (the chunking rule of Liger Kernel's fused
linear cross-entropy: a chunk of logits no larger than ``hidden``) rounded up to a multiple of
:data:`CHUNK_ROWS` = 128, the row tile of the GPU's matrix-multiply kernels (131 or 262 rows
would leave most of a last tile idle in each of the chunk's products), and never more than
``N``. The memory budget is therefore one chunk of logits of at most ``N * H + 127 * V``
elements: ``hidden``'s size plus less than 128 rows of logits (:func:`default_chunk_rows`).
``grad_weight`` and ``grad_bias`` are sums over all chunks: they accumulate in float32 and
are cast to the parameters' dtype once at the end (summing many chunks in bfloat16 would lose
digits at every addition).

The logits are computed in one dtype, forward and backward alike, so that the recomputed
logits are the ones whose ``lse`` forward stored. Outside autocast that is the inputs' shared
dtype. Under autocast (Lightning's ``bf16-mixed``, ``16-mixed``) it is the autocast dtype:
``hidden``, ``weight`` and ``bias`` are cast to it, as ``F.linear`` would cast them, and the
gradients come back in each input's own dtype.
"""

from __future__ import annotations

import contextlib
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

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_fused",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: Rows of a default chunk are a multiple of this: the row tile of cuBLAS/Triton matmuls.
CHUNK_ROWS = 128


def default_chunk_rows(n: int, h: int, v: int) -> int:
    """Rows per chunk when ``chunk_size=None``: ``ceil(N * H / V)`` rounded up to a multiple
    of :data:`CHUNK_ROWS`, at most ``N`` (at least 1).

    A chunk's logits then hold at most ``N * H + (CHUNK_ROWS - 1) * V`` elements.
    """
    rows = max(1, math.ceil(n * h / v))
    return max(1, min(n, math.ceil(rows / CHUNK_ROWS) * CHUNK_ROWS))


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def _gradient_buffers(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``grad_hidden`` (hidden's dtype, each chunk's rows written once) and the float32 sums
    over chunks ``grad_weight`` and ``grad_bias`` (see the module docstring); ``None`` for a
    gradient that ``needs`` does not ask for, or for an absent bias."""
    need_h, need_w, need_b = needs
    acc = torch.float32
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    need_b = need_b and bias is not None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    return grad_h, grad_w, grad_b


def _add_chunk_gradients(
    g: Tensor,
    h: Tensor,
    w: Tensor,
    lo: int,
    hi: int,
    grad_h: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Add the chunk ``[lo, hi)``'s share, given its logits' gradient ``g``: ``grad_h[lo:hi] =
    g @ w`` and ``grad_w += g.T @ h[lo:hi]`` (two matrix products), ``grad_b += g.sum(0)``."""
    if grad_h is not None:
        grad_h[lo:hi] = g @ w  # cast to hidden's dtype on assignment
    if grad_w is not None:
        if g.dtype == grad_w.dtype:
            grad_w.addmm_(g.t(), h[lo:hi])
        else:  # the chunk's product rounded once, then summed in float32
            grad_w += g.t() @ h[lo:hi]
    if grad_b is not None:
        grad_b += g.sum(dim=0, dtype=grad_b.dtype)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device``, or ``None`` when autocast is
    off there (or does not know the device type)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast has no dispatch key for, such as "meta"
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device``'s type: our own casts decide every dtype inside."""
    if _autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _compute_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> torch.dtype:
    """The dtype the logits are computed in (see the module docstring), or a ``ValueError``."""
    named = [("hidden", hidden), ("weight", weight), ("bias", bias)]
    dtype = _autocast_dtype(hidden.device)
    if dtype is None and any(t is not None and t.dtype != hidden.dtype for _, t in named):
        got = ", ".join(f"{name} {t.dtype}" for name, t in named if t is not None)
        raise ValueError(
            f"hidden, weight and bias must share a dtype outside autocast, got {got}. Cast "
            "them to one dtype (for example hidden.to(weight.dtype)), or call under "
            f"torch.autocast({hidden.device.type!r}, dtype=...), which computes the logits "
            "in the autocast dtype"
        )
    for name, t in named:
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return hidden.dtype if dtype is None else dtype


# Custom operators (see cross_entropy.py for why not an autograd.Function). Under
# ``torch.compile`` this matters beyond the graph break: the compiler sees one opaque call, so
# it cannot materialise the ``N x V`` logits that the chunking exists to avoid.
@torch.library.custom_op("lightning_noise::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk: int,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)`` of ``hidden [n, h] @ weight [v, h].T + bias`` against
    ``[n]`` targets, ``chunk`` rows of logits at a time.

    ``dtype`` is the dtype the logits are computed in, forward and backward: ``hidden``,
    ``weight`` and ``bias`` are cast to it (autocast itself is switched off inside), and the
    gradients come back in each input's own dtype. Differentiable once with respect to
    ``hidden``, ``weight`` and ``bias``.
    """
    options = (ignore_index, eps, alpha, zl, impl)
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    amax = torch.empty(n, dtype=torch.int32, device=hidden.device)
    with _without_autocast(hidden.device):
        h, w, b = _cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype)
        for lo, hi in _chunks(n, chunk):
            logits = _logits(h[lo:hi], w, b)
            loss[lo:hi], lse[lo:hi], amax[lo:hi] = rows_forward(logits, target[lo:hi], *options)
            del logits
    return loss, lse, amax


@linear_cross_entropy_forward.register_fake
def _linear_cross_entropy_forward_fake(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk: int,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    n = hidden.shape[0]
    loss = hidden.new_empty(n, dtype=torch.float32)
    return loss, torch.empty_like(loss), hidden.new_empty(n, dtype=torch.int32)


@torch.library.custom_op("lightning_noise::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_loss: Tensor,
    chunk: int,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    dtype: torch.dtype,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of ``sum_i grad_loss[i] * loss_i``; a
    gradient that ``needs`` (three flags) does not ask for, or the gradient of an absent bias,
    is an empty ``[0]`` tensor (an operator returns tensors, not ``None``)."""
    options = (ignore_index, eps, alpha, zl, impl)
    grad_loss = grad_loss.contiguous()
    grad_h, grad_w, grad_b = _gradient_buffers(hidden, weight, bias, needs)
    # The same casts as forward, autocast off as there: the same logits, so that the lse
    # stored forward normalises them exactly.
    with _without_autocast(hidden.device):
        h, w, b = _cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype)
        for lo, hi in _chunks(hidden.shape[0], chunk):
            logits = _logits(h[lo:hi], w, b)
            g = rows_backward(
                logits,
                target[lo:hi],
                lse[lo:hi],
                amax[lo:hi],
                grad_loss[lo:hi],
                *options,
                out=logits,  # the chunk's gradient replaces its logits: no second buffer
            )
            _add_chunk_gradients(g, h, w, lo, hi, grad_h, grad_w, grad_b)
            del logits, g
    none = hidden.new_empty(0)
    return (
        none if grad_h is None else grad_h,
        none.clone() if grad_w is None else grad_w.to(weight.dtype),
        none.clone() if grad_b is None else grad_b.to(bias.dtype),
    )


@linear_cross_entropy_backward.register_fake
def _linear_cross_entropy_backward_fake(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_loss: Tensor,
    chunk: int,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    dtype: torch.dtype,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    need_h, need_w, need_b = needs
    none = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if need_h else none,
        weight.new_empty(weight.shape) if need_w else none.clone(),
        bias.new_empty(bias.shape) if need_b and bias is not None else none.clone(),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    hidden, weight, bias, target, chunk, *options, dtype = inputs
    _, lse, amax = output
    # The inputs are saved as given and cast again in backward: a cast copy of the weight
    # (as large as the weight) is not held from forward to backward.
    ctx.save_for_backward(hidden, weight, bias, target, lse, amax)
    ctx.chunk, ctx.options, ctx.dtype = chunk, tuple(options), dtype
    ctx.mark_non_differentiable(lse, amax)


@differentiable_once(
    "linear_cross_entropy",
    "torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target)",
)
def _backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    hidden, weight, bias, target, lse, amax = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grad_h, grad_w, grad_b = linear_cross_entropy_backward(
        hidden, weight, bias, target, lse, amax, grad_loss, ctx.chunk, *ctx.options, ctx.dtype,
        needs,
    )  # fmt: skip
    grads = [g if need else None for g, need in zip((grad_h, grad_w, grad_b), needs, strict=True)]
    if bias is None:
        grads[2] = None
    return (*grads, None, None, None, None, None, None, None, None)


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------ gradients computed forward (3 products)


@torch.library.custom_op("lightning_noise::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk: int,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    dtype: torch.dtype,
    reduction: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)``: the ``"mean"`` or ``"sum"`` loss of
    ``hidden @ weight.T + bias`` against ``target``, and its gradients for an incoming gradient
    of 1, from one product ``hidden @ weight.T`` per chunk (see the module docstring).

    ``grad_hidden`` is in hidden's dtype; ``grad_weight`` and ``grad_bias`` are the float32
    sums over chunks, cast only in backward. A gradient that ``needs`` does not ask for, or the
    gradient of an absent bias, is an empty ``[0]`` tensor. Differentiable once, through the
    loss only: its backward scales the gradients by the incoming one.
    """
    options = (ignore_index, eps, alpha, zl, impl)
    n = hidden.shape[0]
    valid = target != ignore_index
    # Row weights of the reduction: d loss / d loss_i for the rows not ignored (the fused
    # backward gives ignored rows 0). "mean" divides by their count, kept on the device.
    if reduction == "mean":
        count = valid.sum().clamp_min(1)
        row_weight = (1.0 / count).to(torch.float32).expand(n).contiguous()
    else:
        row_weight = torch.ones(n, dtype=torch.float32, device=hidden.device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h, grad_w, grad_b = _gradient_buffers(hidden, weight, bias, needs)
    with _without_autocast(hidden.device):
        h, w, b = _cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype)
        for lo, hi in _chunks(n, chunk):
            logits = _logits(h[lo:hi], w, b)  # the chunk's only product with the weight
            rows, lse, amax = rows_forward(logits, target[lo:hi], *options)
            loss_rows[lo:hi] = rows
            g = rows_backward(
                logits, target[lo:hi], lse, amax, row_weight[lo:hi], *options, out=logits
            )
            _add_chunk_gradients(g, h, w, lo, hi, grad_h, grad_w, grad_b)
            del logits, g
    loss = reduce_rows(loss_rows, target, ignore_index, reduction, target.shape)
    none = hidden.new_empty(0)
    return (
        loss,
        none if grad_h is None else grad_h,
        none.clone() if grad_w is None else grad_w,
        none.clone() if grad_b is None else grad_b,
    )


@linear_cross_entropy_fused.register_fake
def _linear_cross_entropy_fused_fake(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk: int,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    impl: str,
    dtype: torch.dtype,
    reduction: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    need_h, need_w, need_b = needs
    acc = torch.float32
    none = hidden.new_empty(0)
    return (
        hidden.new_empty((), dtype=acc),
        torch.empty_like(hidden) if need_h else none,
        weight.new_empty(weight.shape, dtype=acc) if need_w else none.clone(),
        bias.new_empty(bias.shape, dtype=acc) if need_b and bias is not None else none.clone(),
    )


def _fused_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    hidden, weight, bias = inputs[:3]
    _, grad_h, grad_w, grad_b = output
    # hidden, weight and bias are not read in backward: saved (references, no copies) so that
    # a gradient asked for with create_graph=True hangs on them and its derivative is refused.
    ctx.save_for_backward(grad_h, grad_w, grad_b, hidden, weight, bias)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.scaled = False
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)


@differentiable_once(
    "linear_cross_entropy",
    "torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target)",
)
def _fused_backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    if ctx.scaled:  # eager only: a compiled backward scales out of place (functionalised)
        raise RuntimeError(
            "linear_cross_entropy's backward ran a second time through one forward (backward "
            "called twice, with or without retain_graph=True): the gradients computed in "
            "forward were scaled in place by the first backward, without a second [V, H] "
            "buffer. Pass recompute=True to linear_cross_entropy to backpropagate through one "
            "loss more than once"
        )
    stored = ctx.saved_tensors[:3]
    ctx.scaled = True
    # grad_loss is a 0-d float32 tensor: each product is computed in float32 and rounded
    # once to the stored dtype (then grad_weight and grad_bias once to the parameters'), and
    # a gradient of 1 leaves the stored values as they are.
    grads = [
        _scale(g, grad_loss).to(dtype) if need and dtype is not None else None
        for g, dtype, need in zip(stored, ctx.dtypes, ctx.needs_input_grad[:3], strict=True)
    ]
    return (*grads, None, None, None, None, None, None, None, None, None, None)


def _scale(stored: Tensor, grad_loss: Tensor) -> Tensor:
    """``stored * grad_loss``, in place in eager mode: no second buffer as large as
    ``grad_weight`` ([V, H] float32). A traced backward (``torch.compile``, AOT autograd:
    its tensors are subclasses such as functional or fake tensors) multiplies out of place,
    since AOT's partitioner refuses a backward that mutates a tensor saved by forward."""
    if type(stored) is Tensor:
        return stored.mul_(grad_loss)
    return stored * grad_loss


linear_cross_entropy_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


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
    recompute: bool | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without storing those logits.

    Args:
        hidden: ``[N, H]`` or ``[N, ..., H]`` features, float32, bfloat16 or float16.
        weight: ``[V, H]`` classifier weight (an ``nn.Linear``'s ``weight``). Outside
            autocast ``hidden``, ``weight`` and ``bias`` must share a dtype; under autocast
            they may differ and the logits are computed in the autocast dtype.
        target: Class indices of shape ``hidden.shape[:-1]``.
        bias: Optional ``[V]`` bias.
        ignore_index, label_smoothing, maxsup_alpha, z_loss, reduction, impl: As in
            :func:`~lightning_noise.kernels.cross_entropy`.
        chunk_size: Rows per chunk; ``None`` chooses :func:`default_chunk_rows`
            (``ceil(N * H / V)`` rounded up to a multiple of 128, at most ``N``).
        recompute: ``True`` recomputes each chunk's logits in backward (four matrix
            products, nothing held from forward to backward but the inputs and three numbers
            per row); ``False`` computes the gradients in forward (three products; holds
            ``grad_hidden`` and a float32 ``grad_weight`` until backward), which needs
            ``reduction="mean"`` or ``"sum"``; ``None`` (default) takes the three-product
            path when the loss is reduced and a gradient of ``hidden``, ``weight`` or
            ``bias`` will be needed. See the module docstring for the memory trade-off.

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
    dtype = _compute_dtype(hidden, weight, bias)
    vocab = weight.shape[0]
    check_target(target, hidden.shape[:-1], vocab, ignore_index, hidden.device)
    eps, alpha, zl, reduction = check_options(label_smoothing, maxsup_alpha, z_loss, reduction)
    rows = hidden.reshape(hidden.shape[:-1].numel(), hidden.shape[-1])
    flat_target = target.reshape(-1).contiguous()
    n = rows.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_rows(n, rows.shape[1], vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    if recompute is not None and not isinstance(recompute, bool):
        raise ValueError(f"recompute must be True, False or None, got {recompute!r}")
    if recompute is False and reduction == "none":
        raise ValueError(
            "recompute=False computes the gradient of a reduced loss in forward, but "
            "reduction='none' was given: pass reduction='mean' or 'sum', or recompute=None "
            "(which recomputes the logits for reduction='none')"
        )
    chosen = resolve_impl(impl, hidden)
    needs = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    if not recompute and reduction != "none" and torch.is_grad_enabled() and any(needs):
        loss, *_ = linear_cross_entropy_fused(
            rows, weight, bias, flat_target, max(1, chunk_size), int(ignore_index), eps, alpha,
            zl, chosen, dtype, reduction, needs,
        )  # fmt: skip
        return loss
    loss, _, _ = linear_cross_entropy_forward(
        rows, weight, bias, flat_target, max(1, chunk_size), int(ignore_index), eps, alpha, zl,
        chosen, dtype,
    )  # fmt: skip
    return reduce_rows(loss, flat_target, ignore_index, reduction, target.shape)
