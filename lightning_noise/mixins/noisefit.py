"""The module side of NoiseFiT: where a training step's loss meets a loss transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_noise._compat import attached_trainer
from lightning_noise.types import LossTransform, find_callbacks

__all__ = ["NoiseFiTMixin"]


class NoiseFiTMixin:
    """The module side of NoiseFiT: turn a training step's loss into the hybrid loss.

    Call :meth:`noisefit_loss` at the end of ``training_step`` with the clean pass's loss and
    logits and a function that runs the forward pass again. Every
    :class:`~lightning_noise.types.LossTransform` among the trainer's callbacks (NoiseFiT)
    then changes the loss, in the order of ``callbacks``; without one it is returned
    unchanged. :meth:`noisefit_inputs` tells the callback which part of a batch the
    calibration pass feeds to ``forward`` (default: ``batch[0]``).
    """

    def noisefit_loss(
        self,
        loss: Tensor,
        logits: Tensor,
        forward: Callable[[], Tensor],
        mask: Tensor | None = None,
    ) -> Tensor:
        for transform in find_callbacks(attached_trainer(self), LossTransform):
            loss = transform.transform_loss(self, loss, logits, forward, mask)  # type: ignore[arg-type]
        return loss

    def noisefit_inputs(self, batch: Any) -> Any:
        return batch[0] if isinstance(batch, list | tuple) else batch
