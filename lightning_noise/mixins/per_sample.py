"""Per-sample loss reduction: the seam between a model and sample-selection methods.

A LightningModule that mixes in :class:`PerSampleLossMixin` computes its loss with
``reduction="none"`` and reduces it with :meth:`PerSampleLossMixin.reduce_loss`. Sample
policies (callbacks implementing :class:`~lightning_noise.types.SamplePolicy`, such as
small-loss selection) then weight or remove samples without the model knowing about them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_noise.types import SampleBatch, SamplePolicy

__all__ = ["PerSampleLossMixin"]


class PerSampleLossMixin:
    """Mixin for a ``LightningModule`` whose loss is a (weighted) mean of per-sample losses.

    Use it in ``training_step``::

        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        batch = SampleBatch.create(index, y, logits, losses)
        loss = self.reduce_loss(losses, batch)
        return self.step_outputs(loss, batch)

    Without any sample policy among ``trainer.callbacks`` the reduction is the plain mean, so
    the mixin changes nothing. With policies, their weights are multiplied and the loss is
    ``sum(w * l) / sum(w)`` over the batch; the fraction of samples kept (``w > 0``) is logged
    as ``train/kept_fraction``.
    """

    def sample_policies(self) -> list[SamplePolicy]:
        """The callbacks of the attached trainer that select or weight samples."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [cb for cb in trainer.callbacks if isinstance(cb, SamplePolicy)]

    def sample_weights(self, batch: SampleBatch) -> Tensor | None:
        """The product of every policy's weights for ``batch``, or ``None`` without policies."""
        policies = self.sample_policies()
        if not policies:
            return None
        weights = torch.ones(len(batch), dtype=torch.float32, device=batch.loss.device)
        for policy in policies:
            w = policy.sample_weights(self.trainer, self, batch)  # type: ignore[attr-defined]
            w = torch.as_tensor(w, device=weights.device, dtype=weights.dtype)
            if w.shape != weights.shape:
                raise ValueError(
                    f"{type(policy).__name__}.sample_weights returned shape {tuple(w.shape)}; "
                    f"it must return one weight per sample, shape {tuple(weights.shape)}"
                )
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError(
                    f"{type(policy).__name__}.sample_weights returned negative or non-finite "
                    "weights; weights must be finite and >= 0 (0 removes a sample)"
                )
            weights = weights * w
        return weights

    def reduce_loss(self, losses: Tensor, batch: SampleBatch) -> Tensor:
        """Reduce ``[B]`` per-sample ``losses`` to a scalar, honouring the sample policies.

        Args:
            losses: per-sample losses with gradient, shape ``[B]``.
            batch: the detached view of the same batch handed to the policies.

        Returns:
            The plain mean without policies, else the weighted mean ``sum(w*l) / sum(w)``.
            When every weight is zero the result is ``0 * losses.sum()`` (a zero loss that
            keeps the graph, so DDP gradient sync and AMP still see every parameter).
        """
        if losses.dim() != 1:
            raise ValueError(
                f"reduce_loss expects per-sample losses of shape [B], got {tuple(losses.shape)}; "
                "compute the loss with reduction='none'"
            )
        weights = self.sample_weights(batch)
        if weights is None:
            return losses.mean()
        weights = weights.to(losses.dtype)
        kept = (weights > 0).float().mean()
        log = getattr(self, "log", None)
        trainer = getattr(self, "_trainer", None)
        # Log only inside a running training loop (self.log raises outside one).
        if callable(log) and trainer is not None and trainer.training:
            log("train/kept_fraction", kept, on_step=False, on_epoch=True, batch_size=len(batch))
        total = weights.sum()
        if float(total) <= 0.0:
            return losses.sum() * 0.0
        return (weights * losses).sum() / total

    @staticmethod
    def step_outputs(loss: Tensor, batch: SampleBatch) -> dict[str, Any]:
        """The dict ``training_step`` returns so observing callbacks can read the batch."""
        return {
            "loss": loss,
            "per_sample_loss": batch.loss,
            "logits": batch.logits,
            "target": batch.target,
            "index": batch.index,
        }
