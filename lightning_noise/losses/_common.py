"""What every loss shares: argument checks, flattening to ``[M, C]`` and reductions.

Conventions of the losses package (PyTorch only, no Lightning):

* ``logits`` are ``[N, C]`` or ``[N, ..., C]``: the class dimension is the **last** one (the
  layout of language-model logits); ``target`` holds class indices of shape
  ``logits.shape[:-1]``.
* Entries whose target equals ``ignore_index`` contribute 0 and do not count.
* ``reduction="none"`` returns a loss of ``target``'s shape (0 where ignored), ``"sum"`` the
  sum, and ``"mean"`` the mean over the entries that are not ignored; a batch whose
  targets are all ignored gives 0 (PyTorch's ``cross_entropy`` gives NaN there).
* Half-precision logits are computed in float32 and the loss is returned in float32.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the given bounds, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return value


def flatten(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``([M, C] logits, [M] target, [M] bool valid)``, checked; ignored targets become 0.

    Half-precision logits are upcast to float32.
    """
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dim() < 2:
        raise ValueError(
            f"logits must be [N, C] or [N, ..., C] (classes last), got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise ValueError(
            f"target must hold integer class indices, got {target.dtype}; for soft targets "
            "use a soft-target loss"
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} (classes "
            f"are the last logits dimension), got {tuple(target.shape)}"
        )
    num_classes = logits.shape[-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat_logits = logits.reshape(-1, num_classes)
    flat_target = target.reshape(-1).long()
    valid = flat_target != ignore_index
    if valid.any():
        bad = flat_target[valid]
        if int(bad.min()) < 0 or int(bad.max()) >= num_classes:
            raise ValueError(
                f"target holds class indices outside [0, {num_classes}) (other than "
                f"ignore_index={ignore_index})"
            )
    return flat_logits, torch.where(valid, flat_target, 0), valid


def reduce(loss: Tensor, valid: Tensor, reduction: str, shape: torch.Size) -> Tensor:
    """Reduce per-entry ``[M]`` losses; ignored entries are zeroed first."""
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def z_loss_term(logits: Tensor) -> Tensor:
    """``[M]`` squared log-partition ``logsumexp(z) ** 2`` (the z-loss of PaLM, Chowdhery et
    al. 2022, and ST-MoE, Zoph et al. 2022)."""
    return torch.logsumexp(logits, dim=-1).square()
