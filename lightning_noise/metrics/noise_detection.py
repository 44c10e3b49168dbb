"""Noise detection: precision, recall and F1 of flagged samples against a known noise mask.

How well a label audit finds the mislabeled samples of a training set, as reported by the
label-noise detection literature (e.g. Pleiss et al., NeurIPS 2020, "Identifying Mislabeled
Data using the Area Under the Margin Ranking"; Northcutt et al., JAIR 2021, "Confident
Learning: Estimating Uncertainty in Dataset Labels"). A sample is a *true positive* when it is
flagged and its label is truly corrupted.

The trainer-free core is :func:`noise_detection_scores` (one call on two masks);
:class:`NoiseDetection` is the torchmetrics adapter that accumulates over updates and ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["NoiseDetection", "noise_detection_scores"]


def _as_mask(value: Any, *, name: str) -> Tensor:
    """``value`` as a 1-D bool tensor; integer tensors must hold only 0 and 1."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if value.dtype != torch.bool:
        if value.dtype.is_floating_point or value.is_complex():
            raise ValueError(f"{name} must be a bool (or 0/1 integer) tensor, got {value.dtype}")
        if value.numel() and not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1 when it is an integer tensor")
        value = value.bool()
    return value.reshape(-1)


def _check_pair(flagged: Any, is_noisy: Any) -> tuple[Tensor, Tensor]:
    flagged_mask = _as_mask(flagged, name="flagged")
    noisy_mask = _as_mask(is_noisy, name="is_noisy")
    if flagged_mask.shape != noisy_mask.shape:
        raise ValueError(
            f"flagged and is_noisy must have the same number of elements, got "
            f"{flagged_mask.numel()} and {noisy_mask.numel()}"
        )
    return flagged_mask, noisy_mask


def _scores(tp: Tensor, fp: Tensor, fn: Tensor) -> dict[str, Tensor]:
    """Precision, recall and F1 from counts; every 0/0 is defined as 0 (see NoiseDetection)."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    zero = torch.zeros_like(tp)

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        # where() alone would still evaluate num / 0; clamping the denominator avoids the nan.
        return torch.where(den > 0, num / den.clamp_min(1), zero)

    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    # F1 = 2 TP / (2 TP + FP + FN): the harmonic mean of precision and recall, 0 when TP = 0.
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}


def noise_detection_scores(flagged: Tensor, is_noisy: Tensor) -> dict[str, Tensor]:
    """Precision, recall and F1 of ``flagged`` samples as detectors of ``is_noisy`` ones.

    Args:
        flagged: ``[N]`` bool (or 0/1 integer): the samples an audit flags as mislabeled.
        is_noisy: ``[N]`` bool (or 0/1 integer): the samples whose label is truly corrupted.

    Returns:
        ``{"precision", "recall", "f1"}``, float32 scalar tensors. A ratio whose denominator
        is 0 is 0, like scikit-learn's ``zero_division=0``: nothing flagged gives precision
        0, no noisy sample gives recall 0, and F1 is 0 whenever no true positive exists.

    Example:
        >>> flagged = torch.tensor([True, True, False, False])
        >>> is_noisy = torch.tensor([True, False, True, False])
        >>> {k: round(float(v), 3) for k, v in noise_detection_scores(flagged, is_noisy).items()}
        {'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
    """
    flagged, is_noisy = _check_pair(flagged, is_noisy)
    tp = (flagged & is_noisy).sum()
    fp = (flagged & ~is_noisy).sum()
    fn = (~flagged & is_noisy).sum()
    return _scores(tp, fp, fn)


class NoiseDetection(Metric):
    """Precision, recall and F1 of flagged samples against a known noise mask.

    Accumulates true positives (flagged and noisy), false positives (flagged, clean label)
    and false negatives (noisy, not flagged) over :meth:`update` calls. The three counts are
    sum-reduced states, so under DDP :meth:`compute` sees the totals of all ranks (each rank
    updates with its own, disjoint samples), and ``merge_state`` combines metrics of separate
    processes.

    Zero division is defined as 0, like scikit-learn's
    ``precision_recall_fscore_support(..., zero_division=0)``: precision is 0 when nothing is
    flagged, recall is 0 when no sample is noisy, and F1 is 0 when there is no true positive.

    The clean labels behind ``is_noisy`` are for evaluation only (DESIGN.md protocol 1); a
    method never reads them.

    Example:
        >>> metric = NoiseDetection()
        >>> metric.update(torch.tensor([True, True]), torch.tensor([True, False]))
        >>> metric.update(torch.tensor([False, True]), torch.tensor([True, True]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'precision': 0.667, 'recall': 0.667, 'f1': 0.667}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: Tensor
    fp: Tensor
    fn: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, flagged: Tensor, is_noisy: Tensor) -> None:
        """Add one batch of samples.

        Args:
            flagged: ``[N]`` bool (or 0/1 integer): flagged as mislabeled by the audit.
            is_noisy: ``[N]`` bool (or 0/1 integer): truly mislabeled.

        Raises:
            ValueError: for masks of different sizes, float masks or integers other than 0/1.
        """
        flagged, is_noisy = _check_pair(flagged, is_noisy)
        flagged, is_noisy = flagged.to(self.tp.device), is_noisy.to(self.tp.device)
        self.tp += (flagged & is_noisy).sum()
        self.fp += (flagged & ~is_noisy).sum()
        self.fn += (~flagged & is_noisy).sum()

    def compute(self) -> dict[str, Tensor]:
        """``{"precision", "recall", "f1"}`` over everything updated (float32 scalars)."""
        return _scores(self.tp, self.fp, self.fn)
