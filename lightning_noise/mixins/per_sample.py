"""Per-sample loss reduction: the seam between a model and sample-selection methods.

A LightningModule that mixes in :class:`PerSampleLossMixin` computes its loss with
``reduction="none"`` and reduces it with :meth:`PerSampleLossMixin.reduce_loss`. Sample
policies (callbacks implementing :class:`~lightning_noise.types.SamplePolicy`, such as
small-loss selection) then weight or remove samples without the model knowing about them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_noise._ce_call import cross_entropy_call, is_class_index_call
from lightning_noise._compat import assert_on_device, attached_trainer
from lightning_noise.types import SampleBatch, SamplePolicy, find_callbacks

__all__ = ["CapturedCrossEntropy", "PerSampleLossMixin"]


class CapturedCrossEntropy(TorchFunctionMode):
    """Turns ``F.cross_entropy(logits, target)`` (mean reduction) into the mixin's reduction.

    Made by :meth:`PerSampleLossMixin.per_sample_losses`; after the ``with`` block,
    :attr:`batch` is the :class:`~lightning_noise.types.SampleBatch` of the (last) call.
    """

    def __init__(self, module: PerSampleLossMixin, index: Tensor) -> None:
        super().__init__()
        self.module = module
        self.index = index
        self.batch: SampleBatch | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is not F.cross_entropy:
            return func(*args, **kwargs)
        call = cross_entropy_call(args, kwargs)
        logits, target = call["input"], call["target"]
        plain_mean = (
            call.get("reduction", "mean") == "mean"
            and is_class_index_call(call)
            and logits.shape[0] == self.index.shape[0]
        )
        if not plain_mean:
            return func(*args, **kwargs)
        if call.get("weight") is not None:
            raise ValueError(
                "per_sample_losses cannot turn a class-weighted F.cross_entropy into per-sample "
                "losses (its mean divides by the sum of the weights); compute the losses with "
                "reduction='none' and call self.reduce_loss yourself"
            )
        call["reduction"] = "none"
        for legacy in ("size_average", "reduce"):
            call.pop(legacy, None)
        losses = func(**call)
        self.batch = SampleBatch.create(self.index, target, logits, losses)
        return self.module.reduce_loss(losses, self.batch)


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

    The mixin is :class:`~lightning_noise.types.Pausable`: when ``training_step`` runs again on
    the same batch inside :meth:`paused_updates` (SAM's second pass), the policies are not
    asked again; the weights of the first pass are reused, call for call. So a policy is asked
    once per batch and its state (Adaptive-k's moving averages) moves once per step, and the
    second pass trains on exactly the samples the first pass kept.
    """

    _weights_paused: bool = False
    _weights_cursor: int = 0
    _weights_step: int | None = None
    _weights_cache: list[Tensor | None]

    def sample_policies(self) -> list[SamplePolicy]:
        """The callbacks of the attached trainer that select or weight samples."""
        return find_callbacks(attached_trainer(self), SamplePolicy)

    @contextlib.contextmanager
    def paused_updates(self) -> Iterator[None]:
        """Reuse the sample weights of this step's first pass instead of asking the policies."""
        self._weights_paused, self._weights_cursor = True, 0
        try:
            yield
        finally:
            self._weights_paused = False

    def sample_weights(self, batch: SampleBatch) -> Tensor | None:
        """The product of every policy's weights for ``batch``, or ``None`` without policies."""
        if self._weights_paused:
            return self._cached_weights(batch)
        weights = self._ask_policies(batch)
        trainer = attached_trainer(self)
        step = None if trainer is None else trainer.global_step
        if step != self._weights_step or not hasattr(self, "_weights_cache"):
            self._weights_step, self._weights_cache = step, []
        self._weights_cache.append(weights)
        return weights

    def _cached_weights(self, batch: SampleBatch) -> Tensor | None:
        cache = getattr(self, "_weights_cache", [])
        if self._weights_cursor >= len(cache):
            raise RuntimeError(
                f"{type(self).__name__}.training_step called reduce_loss more often in a paused "
                "re-run (SAM's second pass) than in the first pass of the step; it must reduce "
                "the same per-sample losses on every pass of a batch"
            )
        weights = cache[self._weights_cursor]
        self._weights_cursor += 1
        if weights is not None and weights.shape[0] != len(batch):
            raise RuntimeError(
                f"{type(self).__name__}: the re-run of training_step reduced {len(batch)} "
                f"losses where the first pass reduced {weights.shape[0]}; the batch must be the "
                "same on every pass of a step"
            )
        return weights

    def _ask_policies(self, batch: SampleBatch) -> Tensor | None:
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
            # On the device (no host sync on an accelerator; one fused check per policy).
            assert_on_device(
                ((w >= 0) & torch.isfinite(w)).all(),
                f"{type(policy).__name__}.sample_weights returned negative or non-finite "
                "weights; weights must be finite and >= 0 (0 removes a sample)",
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
            When every weight is zero the result is ``sum(0 * l) = 0`` (a zero loss that keeps
            the graph, so DDP gradient sync and AMP still see every parameter).
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
        trainer = attached_trainer(self)
        # Log only inside a running training loop (self.log raises outside one).
        if callable(log) and trainer is not None and trainer.training:
            log("train/kept_fraction", kept, on_step=False, on_epoch=True, batch_size=len(batch))
        # Without a host sync: when every weight is 0 the numerator is 0 (a zero loss that keeps
        # the graph, so DDP gradient sync and AMP still see every parameter).
        total = weights.sum()
        return (weights * losses).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)

    @contextlib.contextmanager
    def per_sample_losses(self, index: Tensor) -> Iterator[CapturedCrossEntropy]:
        """Per-sample methods for a ``training_step`` that calls ``F.cross_entropy`` itself.

        Inside the block, a call of ``F.cross_entropy(logits, target)`` (or of an
        ``nn.CrossEntropyLoss`` module) with ``[B, C]`` logits, ``[B]`` targets and the default
        mean reduction returns ``self.reduce_loss(per-sample losses, batch)`` instead: the
        plain mean without sample policies, their weighted mean with them. ``index`` holds the
        ``[B]`` sample indices of the batch. Other calls (another reduction, other shapes)
        are left alone; a block without any call it could turn raises, so nothing is skipped
        silently::

            x, y, index = batch
            with self.per_sample_losses(index) as captured:
                loss = F.cross_entropy(self(x), y)      # unchanged user code
            return self.step_outputs(loss, captured.batch)

        Targets equal to ``ignore_index`` are not supported here (they would count as
        samples of loss 0): compute the losses with ``reduction="none"`` instead.
        """
        captured = CapturedCrossEntropy(self, index)
        with captured:
            yield captured
        if captured.batch is None:
            raise RuntimeError(
                f"{type(self).__name__}.per_sample_losses(index) saw no F.cross_entropy(logits, "
                f"target) call with [B, C] logits, [B] targets (B = {index.shape[0]}, the "
                "length of index) and the default mean reduction; compute the loss inside the "
                "block, or use reduction='none' and self.reduce_loss"
            )

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
