"""What the noisy-label reports share: the known noise of the training set.

Clean labels and noise masks are read here for reports and metrics only, never by a method
(DESIGN.md protocol 1).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

__all__ = ["full_training_set", "known_noise_info"]


def full_training_set(trainer: pl.Trainer) -> Any:
    """The full training set behind ``trainer.train_dataloader`` (a ``Subset`` is unwrapped),
    else the datamodule's ``train_dataset``, else ``None``."""
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        return dataset
    return getattr(getattr(trainer, "datamodule", None), "train_dataset", None)


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
