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

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from lightning_noise.functional.selection import coteaching_forget_rate, coteaching_selection
from lightning_noise.types import SampleBatch

__all__ = ["CoTeachingMixin", "coteaching_forget_rate", "coteaching_selection"]


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

    #: Sample policies (``SmallLossSelection``, ``AdaptiveK``) refuse this module at setup.
    selects_own_samples = True
    _selection_paused: bool = False
    _last_selection: tuple[Tensor, Tensor] | None = None

    @contextlib.contextmanager
    def paused_updates(self) -> Iterator[None]:
        """Reuse this step's selection in a re-run of the step (SAM's second pass): the peers
        keep the samples they picked at ``w``, not at the perturbed weights
        (:class:`~lightning_noise.types.Pausable`)."""
        self._selection_paused = True
        try:
            yield
        finally:
            self._selection_paused = False

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
        if self._selection_paused and self._last_selection is not None:
            keep1, keep2 = self._last_selection
        else:
            keep1, keep2 = coteaching_selection(loss1, loss2, rate, disagree=disagree)
            self._last_selection = (keep1, keep2)
        loss = loss1[keep1].mean() + loss2[keep2].mean()
        stats = {
            "forget_rate": rate,
            "kept_fraction": float(keep1.float().mean()),
            "keep_for_net1": keep1,
            "keep_for_net2": keep2,
        }
        return loss, SampleBatch.create(index, target, logits1, loss1), stats
