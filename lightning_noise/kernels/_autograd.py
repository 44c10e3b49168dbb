"""Once-differentiable backward passes: double backward refused with a clear error.

The kernels' backward passes are written out by hand (fused Triton kernels, or the same
formula in PyTorch with non-differentiable saved statistics such as ``lse``), so they have
no correct derivative of their own. :func:`differentiable_once` decorates such a
``backward``: it runs under ``torch.no_grad()``, and when autograd asks for a graph of the
gradient (``create_graph=True``) it returns gradients whose own backward raises
:class:`DoubleBackwardError` instead of a silently wrong or zero second derivative. A plain
first-order backward (``create_graph=False``) is untouched.

Unlike :func:`torch.autograd.function.once_differentiable`, the refusal holds even when the
incoming gradient does not require grad (a ``"mean"`` reduction's constant), where
``once_differentiable`` would return a gradient detached from the graph and let a
Hessian-vector product silently drop this term.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["DoubleBackwardError", "differentiable_once"]


class DoubleBackwardError(RuntimeError):
    """Raised when a second derivative through a fused kernel is asked for."""


def _message(name: str, alternative: str) -> str:
    return (
        f"double backward through lightning_noise.kernels.{name} is not supported: its "
        "backward is a fused kernel, differentiable once (create_graph=True was used and the "
        "gradient was differentiated again). For higher-order gradients (Hessian-vector "
        f"products, gradient penalties) use plain PyTorch ops: {alternative}"
    )


class _Refuse(torch.autograd.Function):
    """Identity on gradients whose backward raises :class:`DoubleBackwardError`."""

    @staticmethod
    def forward(ctx: Any, message: str, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors[:count]`` (the gradients) as they are; the rest are the anchors that tie
        them into the graph of the Function's inputs."""
        ctx.message = message
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def backward(ctx: Any, *_: Tensor) -> tuple[None, ...]:
        raise DoubleBackwardError(ctx.message)


def differentiable_once(name: str, alternative: str) -> Callable:
    """Decorate an autograd Function's ``backward`` (see the module docstring)."""

    def decorate(backward: Callable) -> Callable:
        message = _message(name, alternative)

        @functools.wraps(backward)
        def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
            if not torch.is_grad_enabled():  # create_graph=False: the usual backward
                with torch.no_grad():
                    return backward(ctx, *grad_outputs)
            # The saved inputs/outputs and incoming gradients that carry a graph: the refusing
            # node hangs on them, so a second grad towards the inputs must pass through it.
            # Read before ``backward``, which may scale saved tensors in place.
            anchors = [
                t
                for t in (*ctx.saved_tensors, *grad_outputs)
                if isinstance(t, Tensor) and t.requires_grad
            ]
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            where = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
            if not where or not anchors:
                return grads[0] if single else grads
            refused = _Refuse.apply(message, len(where), *(grads[i] for i in where), *anchors)
            out = list(grads)
            for i, g in zip(where, refused, strict=True):
                out[i] = g
            return out[0] if single else tuple(out)

        return wrapper

    return decorate
