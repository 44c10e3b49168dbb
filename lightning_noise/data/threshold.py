"""AUM's threshold samples: a random slice of the training set relabelled to a fake class.

Pleiss, Zhang, Elenberg, Weinberger, "Identifying Mislabeled Data using the Area Under the
Margin Ranking", NeurIPS 2020 (official code ``asappresearch/aum``). To decide which area
under the margin (AUM) is low enough to call a label wrong without knowing the noise rate,
``N / (C + 1)`` training samples are given a class that does not exist (``C``, one extra
output of the network): their labels are wrong by construction, so their AUMs show what a
mislabeled sample looks like on this data and this model. A real sample whose AUM is below
the 99th percentile of theirs is flagged (``threshold_flags`` in
:mod:`lightning_noise.callbacks.label_audit`).

The official code (``examples/paper_replication/runner.py``) draws one permutation of the
training set and takes its ``k``-th slice as the threshold samples of run ``k`` (runs 1 and 2
use disjoint slices), so that a sample that was a threshold sample in one run is judged by the
other. Here one training run uses one slice (``set_index``); its threshold samples get no
verdict in that run. The slice has ``N // (C + 1)`` samples, the paper's size (the official
code takes ``N // C``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_noise._validate import check_int

__all__ = ["ThresholdSamples", "threshold_sample_mask"]


def threshold_sample_mask(
    num_samples: int, num_classes: int, *, seed: int = 0, set_index: int = 1
) -> Tensor:
    """``[num_samples]`` bool mask of the ``set_index``-th set of threshold samples.

    A seeded permutation of the samples (the same for every ``set_index``) is cut into slices
    of ``num_samples // (num_classes + 1)``; set ``k`` is slice ``k - 1``, so the sets of two
    runs with ``set_index=1`` and ``2`` are disjoint.

    Example:
        >>> mask = threshold_sample_mask(110, 10, seed=0, set_index=1)
        >>> int(mask.sum()), bool((mask & threshold_sample_mask(110, 10, set_index=2)).any())
        (10, False)
    """
    num_samples = check_int("num_samples", num_samples, minimum=1)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    set_index = check_int("set_index", set_index, minimum=1)
    size = num_samples // (num_classes + 1)
    if size == 0 or set_index * size > num_samples:
        raise ValueError(
            f"threshold samples: set {set_index} of {size} samples (N // (C + 1)) does not fit "
            f"in {num_samples} samples of {num_classes} classes; use set_index 1 or 2 on a "
            "training set of at least C + 1 samples per set"
        )
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
    mask = torch.zeros(num_samples, dtype=torch.bool)
    mask[order[(set_index - 1) * size : set_index * size]] = True
    return mask


class ThresholdSamples(Dataset):
    """Wrap an indexed training set: the threshold samples' label becomes ``num_classes``.

    ``dataset`` yields ``(input, target, index)`` with ``index`` in ``[0, len(dataset))``;
    this wrapper yields the same with ``target = num_classes`` (the fake class) for the
    samples of :func:`threshold_sample_mask`. The model must then have ``num_classes + 1``
    outputs. Every other attribute (``noise_mask``, ``clean_targets``, ``noisy_targets``,
    ``noise_rate``, ...) is the wrapped dataset's, which describe the real labels.

    Args:
        dataset: The indexed training set.
        num_classes: ``C``, the number of real classes; the fake class is ``C``.
        set_index: Which disjoint set (1, 2, ...): one run per set audits every sample.
        seed: Seed of the permutation the sets are cut from.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_noise.data import Indexed
        >>> base = Indexed(TensorDataset(torch.zeros(22, 1), torch.arange(22) % 10))
        >>> data = ThresholdSamples(base, 10)
        >>> int(data.threshold_mask.sum()), sorted({int(data[i][1]) for i in range(22)})[-1]
        (2, 10)
    """

    def __init__(self, dataset: Any, num_classes: int, *, set_index: int = 1, seed: int = 0):
        self.dataset = dataset
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.set_index = check_int("set_index", set_index, minimum=1)
        #: ``[N]`` bool: which samples carry the fake class.
        self.threshold_mask = threshold_sample_mask(
            len(dataset), num_classes, seed=seed, set_index=set_index
        )
        #: The fake class, ``num_classes``.
        self.threshold_class = self.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        x, target, index = self.dataset[i]
        if self.threshold_mask[int(index)]:
            target = self.threshold_class
        return x, target, index

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this wrapper lacks: the wrapped dataset's description.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
