"""The contracts between parts: every way a model and a callback talk (DESIGN.md protocols 1-3).

A callback never imports a mixin and a model never names a concrete callback class: they
meet here. ``SampleBatch`` is what sample policies and observers see; ``SamplePolicy`` weights
samples before the loss is reduced; ``LossTransform`` changes a module's loss (NoiseFiT);
``Pausable`` is state that a re-run of ``training_step`` (SAM's second pass) must not move;
``PerSampleModule`` is a module whose loss is reduced from per-sample losses;
:func:`find_callback` finds the callbacks of one kind. Torch only, no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    import lightning.pytorch as pl

__all__ = [
    "PER_SAMPLE_STEP",
    "SELECTS_OWN_SAMPLES",
    "STEP_OUTPUT_KEYS",
    "DictSampleModule",
    "LossTransform",
    "Pausable",
    "PerSampleModule",
    "SampleBatch",
    "SamplePolicy",
    "as_long_tensor",
    "check_per_sample_module",
    "find_callback",
    "find_callbacks",
]

T = TypeVar("T")

#: Name of the class attribute by which a module says it selects its own training samples
#: (Co-teaching's two networks pick for each other): sample policies refuse such a module.
SELECTS_OWN_SAMPLES = "selects_own_samples"

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


@runtime_checkable
class Pausable(Protocol):
    """State that must move once per optimizer step, however often ``training_step`` runs.

    SAM's second pass re-runs ``training_step`` on the same batch at perturbed weights. Every
    module of the LightningModule (itself included) and every callback that has
    ``paused_updates()`` runs that pass inside it: per-step state (ELR's targets, the sample
    weights cached by :class:`~lightning_noise.mixins.PerSampleLossMixin`, Co-teaching's
    selection, a user's own counters) must then stay as after the first pass, and anything the
    first pass decided for the batch must be reused rather than recomputed.
    """

    def paused_updates(self) -> AbstractContextManager[Any]: ...


@runtime_checkable
class LossTransform(Protocol):
    """A callback that changes a module's training loss (NoiseFiT's hybrid loss).

    The module calls ``transform_loss`` through
    :meth:`~lightning_noise.mixins.NoiseFiTMixin.noisefit_loss` with its clean loss, logits
    and a function that runs the forward pass again; it never names the callback's class.
    """

    def transform_loss(
        self,
        pl_module: pl.LightningModule,
        loss: Tensor,
        logits: Tensor,
        forward: Callable[[], Tensor],
        mask: Tensor | None = None,
    ) -> Tensor: ...


@runtime_checkable
class PerSampleModule(Protocol):
    """A LightningModule whose loss is reduced from per-sample losses (the mixin's methods).

    ``reduce_loss`` asks the sample policies for weights; ``step_outputs`` builds the dict that
    ``training_step`` returns so that observing callbacks read the batch.
    """

    def reduce_loss(self, losses: Tensor, batch: SampleBatch) -> Tensor: ...

    def step_outputs(self, loss: Tensor, batch: SampleBatch) -> dict[str, Any]: ...


@runtime_checkable
class DictSampleModule(Protocol):
    """A LightningModule whose training samples are dicts with an ``"index"`` rather than
    ``(input, target, index)`` (a prompt/response pair of a causal LM).

    ``sample_logits`` gives, for a batch of such samples, the ``[B]`` label and ``[B, C]``
    logits that stand for each sample, the ones its ``training_step`` puts in the
    :class:`SampleBatch` (a pair's first answer token); callbacks that predict over the
    training set (``LabelAudit``) call it instead of ``pl_module(input)``.
    """

    def sample_logits(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]: ...


def find_callbacks(trainer: Any, kind: type[T]) -> list[T]:
    """Every callback of ``trainer`` that is a ``kind`` (a class or a runtime protocol)."""
    return [cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, kind)]


def find_callback(trainer: Any, kind: type[T], *, needed_by: str | None = None) -> T | None:
    """The first callback of ``trainer`` that is a ``kind``, or ``None``.

    With ``needed_by`` (the name of the caller) a missing callback raises a ``RuntimeError``
    that names the fix instead.

    Example:
        >>> class Trainer:
        ...     callbacks = [1, "two"]
        >>> find_callback(Trainer(), str)
        'two'
        >>> find_callback(Trainer(), float, needed_by="MyCallback")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: MyCallback reads float, but the Trainer has no float callback; add it: ...
    """
    found = find_callbacks(trainer, kind)
    if found:
        return found[0]
    if needed_by is not None:
        name = kind.__name__
        raise RuntimeError(
            f"{needed_by} reads {name}, but the Trainer has no {name} callback; add it: "
            f"`Trainer(callbacks=[{name}(), ...])`"
        )
    return None


#: The code a module adds to compute per-sample losses; quoted by every setup-time refusal.
PER_SAMPLE_STEP = """\
    class MyModule(PerSampleLossMixin, L.LightningModule):   # lightning_noise.mixins
        def training_step(self, batch, batch_idx):
            x, y, index = batch  # the dataset wrapped in lightning_noise.data.Indexed
            logits = self(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            sample_batch = SampleBatch.create(index, y, logits, losses)
            return self.step_outputs(self.reduce_loss(losses, sample_batch), sample_batch)"""


def check_per_sample_module(pl_module: Any, who: str, why: str) -> None:
    """Raise at setup unless ``pl_module`` reduces per-sample losses through the mixin.

    Args:
        pl_module: the LightningModule.
        who: the name of the callback that needs it.
        why: what the callback does with the per-sample losses (one clause).
    """
    if not isinstance(pl_module, PerSampleModule):
        raise RuntimeError(
            f"{who} {why}, but {type(pl_module).__name__} does not compute per-sample losses: "
            "it needs lightning_noise.mixins.PerSampleLossMixin and a training_step that "
            "reduces with `self.reduce_loss(losses, batch)` and returns `self.step_outputs(...)`"
            f", like:\n{PER_SAMPLE_STEP}"
        )
