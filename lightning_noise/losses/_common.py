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

import torch
from torch import Tensor

from lightning_noise.kernels._checks import (
    REDUCTIONS,
    check_logits_target,
    check_number,
    check_reduction,
)

__all__ = ["REDUCTIONS", "check_number", "check_reduction", "flatten", "reduce", "z_loss_term"]


def flatten(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``([M, C] logits, [M] target, [M] bool valid)``, checked; ignored targets become 0.

    Half-precision logits are upcast to float32.
    """
    check_logits_target(logits, target, ignore_index)
    num_classes = logits.shape[-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat_logits = logits.reshape(-1, num_classes)
    flat_target = target.reshape(-1).long()
    valid = flat_target != ignore_index
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
