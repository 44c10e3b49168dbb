"""The public base class of sample policies: a user's own policy is a subclass with one method.

A sample policy weights or removes samples before a module reduces its per-sample losses
(DESIGN.md protocol 2, :class:`~lightning_noise.types.SamplePolicy`). The base class carries
what every policy needs so that a new one writes only its rule:

* at ``setup``: the module must reduce per-sample losses
  (:class:`~lightning_noise.mixins.PerSampleLossMixin`), and must not be one that selects its
  own samples (Co-teaching), with an error that shows the code to add;
* outside training (validation, test) every sample is kept and ``select`` is not called;
* at the end of a training epoch: if the module never asked for weights, training stops with
  an error instead of silently training on every sample.

Example, a policy that drops the samples whose loss is above a fixed cut::

    class LossCut(SamplePolicyCallback):
        def __init__(self, cut: float) -> None:
            super().__init__()
            self.cut = cut

        def select(self, trainer, pl_module, batch):
            return (batch.loss <= self.cut).float()

SAM's second pass never asks a policy again: the module reuses the first pass's weights
(:class:`~lightning_noise.types.Pausable`), so ``select`` runs once per training batch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_noise.types import SELECTS_OWN_SAMPLES, SampleBatch, check_per_sample_module

__all__ = ["SamplePolicyCallback"]


class SamplePolicyCallback(Callback):
    """Base class of the callbacks that weight or select samples before the loss is reduced.

    Subclasses implement :meth:`select`, which gets the detached training batch and returns
    ``[B]`` non-negative weights (0 removes a sample). :meth:`sample_weights` (the
    :class:`~lightning_noise.types.SamplePolicy` method the module calls) returns all ones
    outside training and counts the requests, so a module that never asks is caught at the
    end of the epoch.
    """

    def __init__(self) -> None:
        self._asked_this_epoch = 0
        self._batches_this_epoch = 0

    def select(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor:
        """``[B]`` weights >= 0 for a training batch (override this)."""
        raise NotImplementedError

    def sample_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor:
        if not trainer.training:
            return torch.ones(len(batch), dtype=torch.float32, device=batch.loss.device)
        self._asked_this_epoch += 1
        return self.select(trainer, pl_module, batch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if getattr(pl_module, SELECTS_OWN_SAMPLES, False):
            raise ValueError(
                f"{name} cannot select samples for {type(pl_module).__name__}: "
                "Co-teaching already trains each network on the small-loss samples its peer "
                "picks; drop the callback (set the model's forget_rate instead), or use "
                "ImageClassifier for single-network selection"
            )
        check_per_sample_module(
            pl_module,
            name,
            "selects samples before the loss is reduced with `self.reduce_loss(losses, batch)`",
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._asked_this_epoch = 0
        self._batches_this_epoch = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._batches_this_epoch += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A module with the mixin that reduces its loss some other way would train on every
        # sample while this callback appears to be active: fail instead of doing less.
        ran = self._batches_this_epoch
        if ran > 0 and self._asked_this_epoch == 0:
            raise RuntimeError(
                f"{type(self).__name__} was never asked for sample weights during a training "
                f"epoch of {ran} batches: {type(pl_module).__name__}.training_step must reduce "
                "its per-sample losses with `self.reduce_loss(losses, batch)` "
                "(lightning_noise.mixins.PerSampleLossMixin)"
            )
