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

import torch
from torch import Tensor, nn

from lightning_noise.functional.selection import (
    OFFICIAL_PLUS_AGREEMENT_STEPS,
    coteaching_forget_rate,
    coteaching_plus_official_disagreement,
    coteaching_plus_official_update_gate,
    coteaching_selection,
)
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
    Co-teaching+), and optionally ``schedule_offset`` (default 0) and ``plus_variant``
    (default ``"paper"``).

    **Epochs** (``schedule_offset``). The schedule epoch is ``current_epoch +
    schedule_offset``: it picks the forget rate (:func:`coteaching_forget_rate`), is compared
    with ``plus_start_epoch``, and enters the official agreement gate below. 0 (default): the
    first epoch keeps every sample (the paper's Algorithm 1). 1: epochs counted as the
    official training loops count them (``for epoch in range(1, n_epoch)``), so the first
    epoch already forgets ``tau / (T_k - 1)`` and ``plus_start_epoch=20`` starts Co-teaching+
    where the official CIFAR-10 run does (``init_epoch = 20``).

    **Co-teaching+ variants** (``plus_variant``), from ``plus_start_epoch`` on:

    * ``"paper"`` (default): the small-loss exchange among the samples on which the networks'
      arg-max predictions differ, on the module's per-sample loss of the logits; when they
      agree on the whole batch, both are trained on every sample.
    * ``"official_code"``: what ``loss_coteaching_plus`` of ``xingruiyu/coteaching_plus``
      does, which differs in three ways: (1) the loss (for ranking and for the update) is
      the per-sample loss of the *softmax probabilities*, so cross-entropy applies a second
      softmax; (2) when the sample of dataset index 0 is among the disagreements, the last
      disagreeing sample of the batch leaves the set
      (:func:`~lightning_noise.functional.selection.coteaching_plus_official_disagreement`);
      (3) a batch on which the networks agree everywhere is trained on only while
      ``schedule_epoch * batch_idx < 5000`` (the loss is 0 after). Also as that code: when
      ``int((1 - R) * n)`` of ``n`` disagreements is 0, all ``n`` are kept. Use it with
      ``schedule_offset=1`` to count epochs as that code does. ``coteaching_step`` then needs
      ``batch_idx``.

    In both, the loss is the plain mean over the picks (the official code's extra division
    by the number kept is not reproduced).
    """

    forget_rate: float
    num_gradual: int
    exponent: float
    plus_start_epoch: int | None
    #: Added to ``current_epoch`` to give the schedule epoch (0: paper, 1: official loop).
    schedule_offset: int = 0
    #: ``"paper"`` or ``"official_code"`` (see the class docstring).
    plus_variant: str = "paper"

    #: Sample policies (``SmallLossSelection``, ``AdaptiveK``) refuse this module at setup.
    selects_own_samples = True
    _selection_paused: bool = False
    _last_selection: tuple[Tensor, Tensor, float | None] | None = None

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

    def schedule_epoch(self) -> int:
        """``current_epoch + schedule_offset``: the epoch the schedule and the gate read."""
        return int(getattr(self, "current_epoch", 0)) + int(self.schedule_offset)

    def current_forget_rate(self) -> float:
        return coteaching_forget_rate(
            self.schedule_epoch(),
            forget_rate=self.forget_rate,
            num_gradual=self.num_gradual,
            exponent=self.exponent,
        )

    def coteaching_step(
        self, x: Tensor, target: Tensor, index: Tensor, batch_idx: int | None = None
    ) -> tuple[Tensor, SampleBatch, dict[str, Any]]:
        """Forward both networks, select, and return ``(loss, batch of net 1, stats)``.

        ``batch_idx`` (the batch's position in the epoch) is needed by
        ``plus_variant="official_code"`` only.
        """
        if self.plus_variant not in ("paper", "official_code"):
            raise ValueError(
                f"plus_variant must be 'paper' or 'official_code', got {self.plus_variant!r}"
            )
        net1, net2 = self.coteaching_networks()
        logits1, logits2 = net1(x), net2(x)
        epoch = self.schedule_epoch()
        plus = self.plus_start_epoch is not None and epoch >= self.plus_start_epoch
        official = plus and self.plus_variant == "official_code"
        if official and batch_idx is None:
            raise ValueError(
                "plus_variant='official_code' gates agreeing batches by epoch * batch_idx: "
                "call coteaching_step(x, target, index, batch_idx=batch_idx)"
            )
        # The official Co-teaching+ code feeds softmax outputs to F.cross_entropy.
        inputs1, inputs2 = logits1, logits2
        if official:
            inputs1, inputs2 = logits1.softmax(1), logits2.softmax(1)
        loss1 = self.per_sample_loss(inputs1, target)  # type: ignore[attr-defined]
        loss2 = self.per_sample_loss(inputs2, target)  # type: ignore[attr-defined]
        rate = self.current_forget_rate()
        disagree = None
        if plus:
            disagree = logits1.detach().argmax(1) != logits2.detach().argmax(1)
            if official:
                disagree = coteaching_plus_official_disagreement(disagree, index)
        if self._selection_paused and self._last_selection is not None:
            keep1, keep2, gate = self._last_selection
        else:
            keep1, keep2 = coteaching_selection(
                loss1, loss2, rate, disagree=disagree, keep_all_when_none_kept=official
            )
            gate = None
            if official and not bool(disagree.any()):  # type: ignore[union-attr]
                step = int(batch_idx)  # type: ignore[arg-type]
                gate = coteaching_plus_official_update_gate(
                    epoch, step, OFFICIAL_PLUS_AGREEMENT_STEPS
                )
            self._last_selection = (keep1, keep2, gate)
        # Means over the kept samples without boolean indexing (a host sync per step); as
        # ``loss[keep].mean()``, NaN if none is kept.
        loss = _kept_mean(loss1, keep1) + _kept_mean(loss2, keep2)
        if gate is not None:
            loss = loss * gate
        stats = {
            "forget_rate": rate,
            "kept_fraction": keep1.float().mean(),  # a tensor: logged without a host read
            "keep_for_net1": keep1,
            "keep_for_net2": keep2,
            "agreement_gate": 1.0 if gate is None else gate,
        }
        return loss, SampleBatch.create(index, target, logits1, loss1), stats


def _kept_mean(loss: Tensor, keep: Tensor) -> Tensor:
    """``loss[keep].mean()`` computed on the device, without a data-dependent shape."""
    return torch.where(keep, loss, torch.zeros_like(loss)).sum() / keep.sum()
