"""The module side of NoiseFiT (:class:`~lightning_noise.callbacks.NoiseFiT`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["NoiseFiTMixin"]


class NoiseFiTMixin:
    """The module side of NoiseFiT: turn a training step's loss into the hybrid loss.

    Call :meth:`noisefit_loss` at the end of ``training_step`` with the clean pass's loss and
    logits and a function that runs the forward pass again. Without a ``NoiseFiT`` callback
    it returns ``loss`` unchanged. :meth:`noisefit_inputs` tells the callback which part of a
    batch the calibration pass feeds to ``forward`` (default: ``batch[0]``).
    """

    def noisefit_loss(
        self,
        loss: Tensor,
        logits: Tensor,
        forward: Callable[[], Tensor],
        mask: Tensor | None = None,
    ) -> Tensor:
        from lightning_noise.callbacks.noisefit import NoiseFiT

        trainer = getattr(self, "_trainer", None)
        callback = None if trainer is None else NoiseFiT.find(trainer)
        if callback is None:
            return loss
        return callback.hybrid_loss(self, loss, logits, forward, mask)  # type: ignore[arg-type]

    def noisefit_inputs(self, batch: Any) -> Any:
        return batch[0] if isinstance(batch, list | tuple) else batch
