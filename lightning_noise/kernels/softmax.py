"""Softmax with the online normaliser (Milakov and Gimelshein 2018, arXiv:1805.02867).

Forward: one sweep computes the running maximum and the running normaliser together, then
one sweep writes ``exp(x - m) / d`` (2 reads + 1 write per element instead of the safe
softmax's 3 reads + 1 write; a row that fits in one block is read once). Backward:
``dx = y * (dy - sum_k y_k dy_k)`` from the saved output. The PyTorch path is
:func:`torch.softmax` itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_noise._validate import is_int
from lightning_noise.kernels import _triton
from lightning_noise.kernels._autograd import differentiable_once
from lightning_noise.kernels._dispatch import resolve_impl

__all__ = ["softmax", "softmax_backward", "softmax_forward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Custom operators (see cross_entropy.py for why not an autograd.Function): the Triton path
# is one opaque call in a ``torch.compile`` graph. The PyTorch path is ``torch.softmax``
# itself, which the compiler knows already.
@torch.library.custom_op("lightning_noise::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor) -> Tensor:
    """Row softmax of a ``[n, c]`` matrix with contiguous columns, by the Triton kernel.
    Differentiable once (see :mod:`lightning_noise.kernels._autograd`)."""
    return _triton.softmax_forward(x)


@softmax_forward.register_fake
def _softmax_forward_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("lightning_noise::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    """``dx = y * (dy - sum_k y_k dy_k)`` per row, by the Triton kernel."""
    return _triton.softmax_backward(y, dy if dy.stride(-1) == 1 else dy.contiguous())


@softmax_backward.register_fake
def _softmax_backward_fake(y: Tensor, dy: Tensor) -> Tensor:
    return y.new_empty(y.shape)


def _setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(output)


@differentiable_once("softmax", "softmax(..., impl='torch'), which is torch.softmax")
def _backward(ctx: Any, dy: Tensor) -> Tensor:
    (y,) = ctx.saved_tensors
    return softmax_backward(y, dy)


softmax_forward.register_autograd(_backward, setup_context=_setup_context)


def softmax(x: Tensor, dim: int = -1, *, impl: str = "auto") -> Tensor:
    """Softmax of ``x`` along ``dim``; any shape, strides, float32/bfloat16/float16.

    The result has ``x``'s dtype (computed in float32), like :func:`torch.softmax`.

    Example:
        >>> x = torch.randn(3, 5, 7)
        >>> torch.allclose(softmax(x, dim=1, impl="torch"), x.softmax(dim=1))
        True
    """
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES:
        raise ValueError(
            "softmax needs a float32, bfloat16 or float16 tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() == 0:
        raise ValueError("softmax needs at least one dimension")
    if not is_int(dim):
        raise TypeError(f"dim must be an integer, got {dim!r}")
    dim = int(dim) + x.dim() if dim < 0 else int(dim)
    if not 0 <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of {x.dim()} dimensions")
    if resolve_impl(impl, x) == "torch" or x.numel() == 0:  # nothing to launch for no element
        return torch.softmax(x, dim=dim)
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = softmax_forward(rows)
    return y.reshape(moved.shape).movedim(-1, dim)
