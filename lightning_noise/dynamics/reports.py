"""What the per-sample callbacks share about the training set: its full size, its sample
indices and, for reports, its known noise.

Clean labels and noise masks are read here for reports and metrics only, never by a method
(DESIGN.md protocol 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

__all__ = [
    "NEEDS_INDEX",
    "check_indexed_training_set",
    "full_training_set",
    "is_indexed_sample",
    "known_noise_info",
    "unwrap_subset",
]

#: What a callback that reads sample indices says when the training samples have none.
NEEDS_INDEX = (
    "{who} needs training samples (input, target, index) so that it can follow each sample "
    "across epochs; wrap your training dataset: `lightning_noise.data.Indexed(dataset)` (or "
    "lightning_noise.data.NoisyLabels(dataset, ...) to add label noise too)"
)


def unwrap_subset(dataset: Any) -> Any:
    """The dataset behind any nesting of ``Subset``: sample indices are positions in the
    *full* training set (DESIGN.md protocol 1), e.g. under Late Stopping's shrinking set."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def full_training_set(trainer: pl.Trainer) -> Any:
    """The full training set behind ``trainer.train_dataloader`` (a ``Subset`` is unwrapped),
    else the datamodule's ``train_dataset``, else ``None``."""
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        return unwrap_subset(loader.dataset)
    return getattr(getattr(trainer, "datamodule", None), "train_dataset", None)


def is_indexed_sample(sample: Any) -> bool:
    """Whether a dataset item is ``(input, target, index)``, or a dict with an ``"index"``
    (a prompt/response pair of :class:`~lightning_noise.data.PromptResponseDataModule`: its
    module says what its label and logits are, :class:`~lightning_noise.types.DictSampleModule`).
    """
    if isinstance(sample, Mapping):
        return "index" in sample
    return isinstance(sample, list | tuple) and len(sample) == 3


def check_indexed_training_set(trainer: pl.Trainer, who: str) -> None:
    """Raise before the first training batch unless the training samples carry an index.

    Looks at the first sample of the map-style dataset behind ``trainer.train_dataloader``;
    an iterable dataset (no length) is not checked here.
    """
    dataset = full_training_set(trainer)
    try:
        size = len(dataset)
    except TypeError:
        return
    if size and not is_indexed_sample(dataset[0]):
        first = dataset[0]
        if isinstance(first, Mapping):
            got = f"the keys {sorted(first)}, no 'index'"
        else:
            got = f"{len(first)} items" if isinstance(first, list | tuple) else "one item"
        raise ValueError(NEEDS_INDEX.format(who=who) + f" (a sample has {got})")


def known_noise_info(
    trainer: pl.Trainer, dataset: Any, n: int
) -> tuple[Tensor | None, Tensor | None]:
    """``(noise_mask, clean_targets)`` of the training set when it knows them, else ``None``.

    Looks at ``dataset`` first, then at ``trainer.datamodule``. ``clean_targets`` is ``None``
    when the source has none.

    Raises:
        ValueError: when the mask does not have one entry per sample of the ``n``-sample
            training set.
    """
    mask = clean = None
    for source in (dataset, getattr(trainer, "datamodule", None)):
        if source is not None and getattr(source, "noise_mask", None) is not None:
            mask = torch.as_tensor(source.noise_mask, dtype=torch.bool).reshape(-1).cpu()
            clean = getattr(source, "clean_targets", None)
            break
    if mask is None:
        return None, None
    if mask.numel() != n:
        raise ValueError(
            f"the training set's noise_mask has {mask.numel()} entries but the "
            f"TrainingDynamics store indexes {n} samples; they must describe the same set"
        )
    if clean is not None:
        clean = torch.as_tensor(clean, dtype=torch.long).reshape(-1).cpu()
        if clean.numel() != n:
            clean = None
    return mask, clean
