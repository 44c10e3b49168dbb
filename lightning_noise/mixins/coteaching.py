"""Co-teaching (Han et al., NeurIPS 2018) and Co-teaching+ (Yu et al., ICML 2019).

Two networks train together; in every mini-batch each network picks its small-loss samples
(likely clean) and its *peer* is updated on them, so that the two filter each other's errors
instead of confirming their own. Co-teaching+ (after ``plus_start_epoch``) restricts the
exchange to the samples on which the two networks' predictions disagree.

The selection is a plain function, :func:`coteaching_selection`; :class:`CoTeachingMixin`
adds the two-network training step to a LightningModule, and
:class:`~lightning_noise.models.CoTeachingClassifier` is the ready model on timm backbones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# One schedule for Co-teaching and small-loss selection: the official rate_schedule, exactly.
from lightning_noise.callbacks.sample_selection import coteaching_forget_rate
from lightning_noise.types import SampleBatch

__all__ = ["CoTeachingMixin", "coteaching_forget_rate", "coteaching_selection"]


def _small_loss(losses: Tensor, candidates: Tensor, forget_rate: float) -> Tensor:
    """Boolean mask of the ``int((1 - forget_rate) * n)`` smallest losses among candidates.

    At least one sample is kept; ties go to the earlier position (stable sort).
    """
    keep = torch.zeros_like(candidates)
    positions = candidates.nonzero().squeeze(1)
    n = positions.numel()
    if n == 0:
        return keep
    num_remember = max(1, int((1.0 - forget_rate) * n))
    order = torch.sort(losses.detach()[positions], stable=True).indices
    keep[positions[order[:num_remember]]] = True
    return keep


def coteaching_selection(
    loss1: Tensor,
    loss2: Tensor,
    forget_rate: float,
    *,
    disagree: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Which samples update each network: ``(keep_for_net1, keep_for_net2)``.

    Network 1 is updated on the small-loss samples of network 2, and vice versa (Han et al.
    2018, Algorithm 1). With ``disagree`` (Co-teaching+, Yu et al. 2019) the selection runs
    only among the samples where the networks' predictions differ; when they agree on the
    whole batch, both networks are updated on every sample (as the official code).

    Args:
        loss1: ``[B]`` per-sample losses of network 1.
        loss2: ``[B]`` per-sample losses of network 2.
        forget_rate: fraction dropped, in [0, 1).
        disagree: optional ``[B]`` bool mask of disagreement.
    """
    if loss1.shape != loss2.shape or loss1.dim() != 1:
        raise ValueError(
            f"loss1 and loss2 must be per-sample [B] losses of one shape, got "
            f"{tuple(loss1.shape)} and {tuple(loss2.shape)}"
        )
    candidates = torch.ones_like(loss1, dtype=torch.bool)
    if disagree is not None:
        if not bool(disagree.any()):
            return candidates, candidates.clone()
        candidates = disagree.bool()
    picked_by_1 = _small_loss(loss1, candidates, forget_rate)
    picked_by_2 = _small_loss(loss2, candidates, forget_rate)
    return picked_by_2, picked_by_1


class CoTeachingMixin:
    """Two-network training step for a LightningModule (Co-teaching / Co-teaching+).

    The module provides two networks through :meth:`coteaching_networks` and a per-sample
    loss ``per_sample_loss(logits, target)``; :meth:`coteaching_step` returns the training
    loss ``mean(loss1 over peer's picks) + mean(loss2 over peer's picks)``. Both networks can
    share one optimizer: their parameters are disjoint, so each receives only its own
    gradient. (The official code divides each mean once more by the number kept, which scales
    the learning rate; we take the plain mean.)

    Selection is per device batch under DDP, the paper's per-mini-batch semantics with the
    per-device batch as the mini-batch; the gradients are then averaged as usual.

    Attributes read from the module: ``forget_rate`` (float in [0, 1)), ``num_gradual``,
    ``exponent`` and ``plus_start_epoch`` (``None`` for Co-teaching, an epoch for
    Co-teaching+).
    """

    forget_rate: float
    num_gradual: int
    exponent: float
    plus_start_epoch: int | None

    def coteaching_networks(self) -> tuple[nn.Module, nn.Module]:  # pragma: no cover
        raise NotImplementedError

    def current_forget_rate(self) -> float:
        epoch = int(getattr(self, "current_epoch", 0))
        return coteaching_forget_rate(
            epoch,
            forget_rate=self.forget_rate,
            num_gradual=self.num_gradual,
            exponent=self.exponent,
        )

    def coteaching_step(
        self, x: Tensor, target: Tensor, index: Tensor
    ) -> tuple[Tensor, SampleBatch, dict[str, Any]]:
        """Forward both networks, select, and return ``(loss, batch of net 1, stats)``."""
        net1, net2 = self.coteaching_networks()
        logits1, logits2 = net1(x), net2(x)
        loss1 = self.per_sample_loss(logits1, target)  # type: ignore[attr-defined]
        loss2 = self.per_sample_loss(logits2, target)  # type: ignore[attr-defined]
        rate = self.current_forget_rate()
        disagree = None
        epoch = int(getattr(self, "current_epoch", 0))
        if self.plus_start_epoch is not None and epoch >= self.plus_start_epoch:
            disagree = logits1.detach().argmax(1) != logits2.detach().argmax(1)
        keep1, keep2 = coteaching_selection(loss1, loss2, rate, disagree=disagree)
        loss = loss1[keep1].mean() + loss2[keep2].mean()
        stats = {
            "forget_rate": rate,
            "kept_fraction": float(keep1.float().mean()),
            "keep_for_net1": keep1,
            "keep_for_net2": keep2,
        }
        return loss, SampleBatch.create(index, target, logits1, loss1), stats
