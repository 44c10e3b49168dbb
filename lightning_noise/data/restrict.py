"""Restrict any training loader to a subset of its samples (Late Stopping's shrinking set).

A DataModule of this library shrinks its training set itself (``set_train_indices``). For any
other DataModule, :func:`restrict_loader` rebuilds the loader it returns over
``Subset(dataset, indices)`` with the same batch size, shuffling, workers and collate
function, so that removed samples are never loaded again.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

__all__ = ["restrict_loader"]


def restrict_loader(loader: Any, indices: Tensor | None) -> Any:
    """``loader`` over the samples at ``indices`` of its dataset (``None``: unchanged).

    ``indices`` are positions in the loader's dataset, which are the sample indices when the
    dataset yields them (DESIGN.md protocol 1, :class:`~lightning_noise.data.Indexed`).

    Raises:
        TypeError: when ``loader`` is not a ``DataLoader`` with a plain random or sequential
            sampler (a custom sampler cannot be restricted from outside); the message names
            the fix.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=2)
        >>> [b[0].tolist() for b in restrict_loader(loader, torch.tensor([1, 4, 5]))]
        [[1, 4], [5]]
    """
    if indices is None:
        return loader
    fix = (
        "give the DataModule a `set_train_indices(indices)` method that builds its next "
        "training loader over those samples only (see docs/methods/late_stopping.md)"
    )
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"cannot restrict a training loader of type {type(loader).__name__} to the kept "
            f"samples; return one torch DataLoader from train_dataloader, or {fix}"
        )
    if loader.batch_size is None or not isinstance(
        loader.sampler, RandomSampler | SequentialSampler
    ):
        raise TypeError(
            f"cannot restrict a DataLoader with a custom sampler ({type(loader.sampler).__name__})"
            f" to the kept samples; {fix}"
        )
    shuffle = isinstance(loader.sampler, RandomSampler)
    workers = loader.num_workers
    # The same loader class: a torchdata StatefulDataLoader stays resumable mid-epoch.
    return type(loader)(
        Subset(loader.dataset, indices.long().tolist()),
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=loader.sampler.generator if shuffle else None,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if workers > 0 else False,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
    )
