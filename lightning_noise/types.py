"""The seams between parts: what sample policies and observers see (DESIGN.md protocols 1-2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    import lightning.pytorch as pl

__all__ = ["STEP_OUTPUT_KEYS", "SampleBatch", "SamplePolicy", "as_long_tensor"]

#: Keys of the dict that a per-sample ``training_step`` returns (see ``PerSampleLossMixin``).
STEP_OUTPUT_KEYS = ("loss", "per_sample_loss", "logits", "target", "index")


def as_long_tensor(value: Any, *, name: str) -> Tensor:
    """Return ``value`` as a 1-D int64 tensor, or raise a ``TypeError`` naming ``name``."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    return value.reshape(-1).long()


@dataclass(frozen=True)
class SampleBatch:
    """One training batch as seen by sample policies and observing callbacks.

    All tensors are detached. ``index`` is the position of each sample in the full training
    set (stable across epochs and ranks), ``target`` the given (possibly noisy) label,
    ``logits`` the model output and ``loss`` the per-sample loss.

    Example:
        >>> b = SampleBatch(torch.arange(2), torch.tensor([0, 1]), torch.zeros(2, 3), torch.ones(2))
        >>> len(b)
        2
    """

    index: Tensor
    target: Tensor
    logits: Tensor
    loss: Tensor

    def __post_init__(self) -> None:
        n = self.index.shape[0] if self.index.dim() == 1 else -1
        if n < 0:
            raise ValueError(f"SampleBatch.index must be 1-D, got shape {tuple(self.index.shape)}")
        if self.target.dim() != 1 or self.target.shape[0] != n:
            raise ValueError(
                f"SampleBatch.target must have shape [{n}], got {tuple(self.target.shape)}"
            )
        if self.logits.dim() != 2 or self.logits.shape[0] != n:
            raise ValueError(
                f"SampleBatch.logits must have shape [{n}, C], got {tuple(self.logits.shape)}"
            )
        if self.loss.dim() != 1 or self.loss.shape[0] != n:
            raise ValueError(
                f"SampleBatch.loss must have shape [{n}] (per-sample, reduction='none'), "
                f"got {tuple(self.loss.shape)}"
            )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def correct(self) -> Tensor:
        """``[B]`` bool: whether the arg-max prediction equals the given label."""
        return self.logits.argmax(dim=1) == self.target

    @property
    def margin(self) -> Tensor:
        """``[B]`` the AUM margin: assigned logit minus the largest other logit (Pleiss 2020)."""
        assigned = self.logits.gather(1, self.target.view(-1, 1)).squeeze(1)
        others = self.logits.scatter(1, self.target.view(-1, 1), float("-inf"))
        return assigned - others.max(dim=1).values

    @classmethod
    def create(cls, index: Tensor, target: Tensor, logits: Tensor, loss: Tensor) -> SampleBatch:
        """Build a batch from live tensors, detaching them and casting indices to int64."""
        return cls(
            index=as_long_tensor(index.detach(), name="index"),
            target=as_long_tensor(target.detach(), name="target"),
            logits=logits.detach(),
            loss=loss.detach(),
        )

    @classmethod
    def from_outputs(cls, outputs: Any) -> SampleBatch:
        """Build a batch from the dict a per-sample ``training_step`` returns.

        Raises:
            TypeError: when ``outputs`` is not such a dict, naming the missing keys and the fix.
        """
        needed = ("per_sample_loss", "logits", "target", "index")
        if not isinstance(outputs, Mapping) or any(k not in outputs for k in needed):
            have = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise TypeError(
                f"this callback needs training_step to return a dict with keys {list(needed)} "
                f"(got {have}); return `self.step_outputs(loss, batch)` from a LightningModule "
                "that uses lightning_noise.mixins.PerSampleLossMixin"
            )
        return cls.create(
            outputs["index"], outputs["target"], outputs["logits"], outputs["per_sample_loss"]
        )


@runtime_checkable
class SamplePolicy(Protocol):
    """A callback that selects or weights samples before the loss is reduced.

    ``sample_weights`` returns a ``[B]`` tensor of non-negative weights (0 removes a sample).
    ``PerSampleLossMixin.reduce_loss`` multiplies the weights of every policy among
    ``trainer.callbacks``.
    """

    def sample_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor: ...
