"""Early-learning regularization (ELR; Liu, Niles-Weed, Razavian, Fernandez-Granda, NeurIPS
2020, "Early-Learning Regularization Prevents Memorization of Noisy Labels"; official code
``shengliu66/ELR``).

Early in training a network predicts the true class of many mislabeled samples. ELR keeps,
for every training sample ``i``, a target ``t_i``: a moving average of its predictions,
``t_i <- beta * t_i + (1 - beta) * p_i / sum(p_i)`` with ``p_i = clamp(softmax(z_i), 1e-4,
1 - 1e-4)`` detached, and adds ``lambda * log(1 - <t_i, p_i>)`` to the cross-entropy. The term
pulls the prediction towards its own early-learning target and away from memorising a wrong
label. Paper settings: ``beta = 0.7, lambda = 3`` on CIFAR-10 (symmetric noise), ``0.9, 7`` on
CIFAR-100, ``0.9, 1`` on CIFAR-10 asymmetric.

The targets are indexed by the sample's position in the training set, so the loss needs the
batch's indices (DESIGN.md protocol 1): ``criterion(logits, target, index=index)``;
:class:`~lightning_noise.models.ImageClassifier` passes them. They are updated in training
mode only (before the loss, as in the official code), all-gathered across DDP ranks so every
rank holds the same targets, and saved in the module's ``state_dict`` (``_extra_state``, not a
buffer: DDP would broadcast a buffer at every forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noise._validate import check_int
from lightning_noise.losses._common import check_number, check_reduction, flatten, reduce

__all__ = ["ELRLoss", "elr_regularizer", "elr_update"]

_CLAMP = 1e-4  # the official clamp of the predicted probabilities


def elr_update(targets: Tensor, probs: Tensor, beta: float) -> Tensor:
    """``beta * targets + (1 - beta) * probs / probs.sum(-1)`` (rows of ``[B, C]``).

    Example:
        >>> t = torch.zeros(1, 2)
        >>> elr_update(t, torch.tensor([[0.6, 0.2]]), 0.5).tolist()
        [[0.375, 0.125]]
    """
    return beta * targets + (1.0 - beta) * probs / probs.sum(dim=-1, keepdim=True)


def elr_regularizer(probs: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` ``log(1 - <t_i, p_i>)``, the ELR term (before its weight ``lambda``)."""
    return torch.log(1.0 - (targets * probs).sum(dim=-1))


def _all_gather_rows(rows: Tensor) -> Tensor:
    """Concatenate ``[B, D]`` rows of every rank in rank order (uneven ``B`` padded)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = rows.new_zeros(max(counts), rows.shape[1])
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])


class ELRLoss(nn.Module):
    """Cross-entropy plus early-learning regularization: ``CE + lambda * log(1 - <t_i, p_i>)``.

    Args:
        beta: Momentum of the per-sample targets, in ``[0, 1)`` (official: 0.7 on CIFAR-10).
        lam: Weight ``lambda`` of the regularizer, >= 0 (official: 3 on CIFAR-10).
        num_samples: Size of the training set; ``None`` grows the target table to the
            largest index seen.
        ignore_index: Target value that is ignored (no loss, no target update).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Call it as ``loss(logits, target, index=index)`` in training; ``index`` holds each
    entry's position in the training set and has ``target``'s shape. Without ``index``
    (e.g. validation) it is plain cross-entropy, which is what the official code validates
    with; in training mode ``index`` is required. A sample whose prediction is not finite
    (NaN/inf logits) gets a NaN loss but keeps its target: the table never records it.

    Example:
        >>> loss = ELRLoss(beta=0.7, lam=3.0, num_samples=4)
        >>> logits, target = torch.randn(2, 3), torch.tensor([0, 2])
        >>> value = loss(logits, target, index=torch.tensor([1, 3]))
        >>> loss.targets.shape
        torch.Size([4, 3])
    """

    #: ImageClassifier passes ``index=`` to criteria that set this.
    needs_index = True

    def __init__(
        self,
        beta: float = 0.7,
        lam: float = 3.0,
        *,
        num_samples: int | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, low=0.0, high=1.0, high_open=True)
        self.lam = check_number("lam", lam, low=0.0)
        self.num_samples = check_int("num_samples", num_samples, minimum=1, optional=True)
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)
        self._targets: Tensor | None = None  # [capacity, C]
        self._size = 0  # rows in use
        self._paused = False

    @property
    def targets(self) -> Tensor:
        """``[N, C]`` the per-sample targets ``t_i`` (zeros before a sample's first update)."""
        if self._targets is None:
            return torch.zeros(0, 0)
        return self._targets[: self._size]

    @contextlib.contextmanager
    def paused_updates(self) -> Iterator[None]:
        """Compute the loss without updating the targets (SAM's second pass uses it)."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    # ---------------------------------------------------------------- target table
    def _ensure_rows(self, needed: int, num_classes: int, like: Tensor) -> None:
        if self.num_samples is not None and needed > self.num_samples:
            raise ValueError(
                f"sample index {needed - 1} is outside num_samples={self.num_samples}; "
                "indices must be positions in the training set"
            )
        if self._targets is not None and self._targets.shape[1] != num_classes:
            raise ValueError(
                f"ELRLoss holds targets for {self._targets.shape[1]} classes but the logits "
                f"have {num_classes}"
            )
        capacity = 0 if self._targets is None else self._targets.shape[0]
        if needed > capacity or self._targets is None:
            if self.num_samples is not None:
                new_capacity = self.num_samples
            else:
                new_capacity = max(needed, 2 * capacity)
            table = like.new_zeros(new_capacity, num_classes, dtype=torch.float32)
            if self._targets is not None:
                table[:capacity] = self._targets.to(table.device)
            self._targets = table
        elif self._targets.device != like.device:
            self._targets = self._targets.to(like.device)
        self._size = max(self._size, needed if self.num_samples is None else self.num_samples)

    # ---------------------------------------------------------------- forward
    def forward(self, logits: Tensor, target: Tensor, index: Tensor | None = None) -> Tensor:
        flat, y, valid = flatten(logits, target, self.ignore_index)
        ce = F.cross_entropy(flat, y, reduction="none")
        if index is None:
            if self.training and not self._paused:
                raise ValueError(
                    "ELRLoss needs each sample's index in training: call "
                    "criterion(logits, target, index=index) (ImageClassifier does)"
                )
            return reduce(ce, valid, self.reduction, target.shape)
        if tuple(index.shape) != tuple(target.shape):
            raise ValueError(
                f"index must have target's shape {tuple(target.shape)}, got {tuple(index.shape)}"
            )
        if not self.training:
            return reduce(ce, valid, self.reduction, target.shape)
        idx = index.reshape(-1).long()
        probs = flat.softmax(dim=-1).clamp(_CLAMP, 1.0 - _CLAMP)
        num_classes = flat.shape[1]
        if not self._paused:
            self._update(idx[valid], probs[valid].detach(), num_classes, flat)
        elif self._targets is None:
            self._ensure_rows(int(idx.max()) + 1 if idx.numel() else 0, num_classes, flat)
        assert self._targets is not None
        rows = torch.zeros_like(probs)
        if valid.any():
            rows[valid] = self._targets[idx[valid].to(self._targets.device)].to(rows)
        loss = ce + self.lam * elr_regularizer(probs, rows)
        return reduce(loss, valid, self.reduction, target.shape)

    @torch.no_grad()
    def _update(self, idx: Tensor, probs: Tensor, num_classes: int, like: Tensor) -> None:
        rows = torch.cat([idx[:, None].to(probs.dtype), probs.float()], dim=1)
        if rows.dtype != torch.float64:
            rows = rows.double()  # exact indices up to 2**53
        rows = _all_gather_rows(rows)
        if rows.numel() == 0:
            self._ensure_rows(0, num_classes, like)
            return
        all_idx, all_probs = rows[:, 0].long(), rows[:, 1:].float()
        if int(all_idx.min()) < 0:
            raise ValueError("sample indices must be >= 0")
        self._ensure_rows(int(all_idx.max()) + 1, num_classes, like)
        assert self._targets is not None
        # A sample twice in the gathered batch (DDP pads by repeating): the last one wins.
        last = torch.ones_like(all_idx, dtype=torch.bool)
        order = torch.argsort(all_idx, stable=True)
        sorted_idx = all_idx[order]
        last[order[:-1]] = sorted_idx[1:] != sorted_idx[:-1]
        all_idx, all_probs = all_idx[last], all_probs[last].to(self._targets.device)
        all_idx = all_idx.to(self._targets.device)
        # A sample whose prediction is not finite (NaN/inf logits) keeps its target: one bad
        # step must not poison its moving average for the rest of training (issue 13).
        old = self._targets[all_idx]
        finite = torch.isfinite(all_probs).all(dim=1, keepdim=True)
        self._targets[all_idx] = torch.where(finite, elr_update(old, all_probs, self.beta), old)

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {"targets": self.targets.detach().cpu().clone(), "size": self._size}

    def set_extra_state(self, state: Any) -> None:
        targets = state["targets"]
        self._size = int(state["size"])
        self._targets = None if targets.numel() == 0 else targets.clone().float()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lam={self.lam}, num_samples={self.num_samples}"
