"""Argument checks shared by the kernels and the losses (classes-last logits, index targets)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_noise._compat import assert_on_device
from lightning_noise._validate import check_choice, check_int, check_number

__all__ = [
    "REDUCTIONS",
    "check_logits_target",
    "check_number",
    "check_reduction",
    "check_target",
]

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: Any) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_logits_target(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    """Raise a clear error unless ``logits`` is ``[N, C]`` or ``[N, ..., C]`` floating point
    and ``target`` holds class indices in ``[0, C)`` (or ``ignore_index``) with shape
    ``logits.shape[:-1]``."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dim() < 2:
        raise ValueError(
            f"logits must be [N, C] or [N, ..., C] (classes last), got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(
            f"logits have no classes: the last (class) dimension of shape "
            f"{tuple(logits.shape)} is 0"
        )
    check_target(target, logits.shape[:-1], logits.shape[-1], ignore_index, logits.device)


def check_target(
    target: Tensor,
    shape: tuple[int, ...] | torch.Size,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
) -> None:
    """Raise a clear error unless ``target`` holds class indices in ``[0, num_classes)`` (or
    ``ignore_index``) with ``shape`` on ``device``."""
    if not isinstance(target, Tensor):
        raise TypeError("target must be a tensor")
    check_int("ignore_index", ignore_index)
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise ValueError(
            f"target must hold integer class indices, got {target.dtype}; for soft targets "
            "use a soft-target loss"
        )
    if tuple(target.shape) != tuple(shape):
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(shape)} (classes "
            f"are the last logits dimension), got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits on {device}")
    # One fused reduction kept on the device, no host sync on an accelerator (DESIGN.md 8):
    # the old ``bool(any)``, boolean indexing and ``int(min)``/``int(max)`` were four syncs a
    # call. On the CPU the verdict is read at once; on CUDA it is a device-side assert that
    # fails at the next synchronisation (see ``assert_on_device``). Cost: two compares, an
    # ``or`` and an ``all`` over the targets, no copy to the host.
    in_range = (target >= 0) & (target < num_classes) | (target == ignore_index)
    assert_on_device(
        in_range.all(),
        f"target holds class indices outside [0, {num_classes}) (other than "
        f"ignore_index={ignore_index})",
    )
