"""One reading of a ``F.cross_entropy`` call, for the torch-function modes that intercept it.

Both :class:`~lightning_noise.mixins.per_sample.CapturedCrossEntropy` (per-sample losses from
a user's ``F.cross_entropy``) and the loss router of
:mod:`lightning_noise.functional.lm_head` (our fused kernel in a Hugging Face loss function)
see the call as ``(func, args, kwargs)`` and must name its arguments the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["cross_entropy_call", "is_class_index_call"]

#: ``F.cross_entropy``'s positional parameters, in order (the rest are keyword-only in use).
_POSITIONAL = ("input", "target", "weight", "size_average", "ignore_index", "reduce")


def cross_entropy_call(args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The call's arguments by name: ``F.cross_entropy(x, y, reduction="sum")`` gives
    ``{"input": x, "target": y, "reduction": "sum"}`` (defaults are not filled in).

    Example:
        >>> sorted(cross_entropy_call((1, 2), {"reduction": "sum"}))
        ['input', 'reduction', 'target']
    """
    return {**dict(zip(_POSITIONAL, args, strict=False)), **dict(kwargs or {})}


def is_class_index_call(call: Mapping[str, Any]) -> bool:
    """Whether the call is ``[N, C]`` logits against ``[N]`` class indices, without the legacy
    ``size_average`` / ``reduce`` arguments (the only form both interceptors rewrite)."""
    logits, target = call.get("input"), call.get("target")
    return (
        isinstance(logits, Tensor)
        and isinstance(target, Tensor)
        and logits.dim() == 2
        and target.dim() == 1
        and not target.dtype.is_floating_point
        and call.get("size_average") is None
        and call.get("reduce") is None
    )
