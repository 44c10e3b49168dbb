"""Losses for noisy labels and calibration: functions on tensors and thin ``nn.Module`` s.

Every loss takes logits ``[N, C]`` or ``[N, ..., C]`` (classes last), integer targets of
shape ``logits.shape[:-1]``, ``ignore_index`` and ``reduction="none" | "mean" | "sum"``
(see :mod:`lightning_noise.losses._common`). PyTorch only; no Lightning.
"""

from lightning_noise.losses.elr import ELRLoss, elr_regularizer, elr_update
from lightning_noise.losses.robust import (
    GeneralizedCrossEntropy,
    MeanAbsoluteError,
    NCEandMAE,
    NCEandRCE,
    NormalizedCrossEntropy,
    ReverseCrossEntropy,
    SymmetricCrossEntropy,
    generalized_cross_entropy,
    mean_absolute_error,
    nce_and_mae,
    nce_and_rce,
    normalized_cross_entropy,
    reverse_cross_entropy,
    symmetric_cross_entropy,
)
from lightning_noise.losses.smoothing import (
    LabelSmoothingCrossEntropy,
    MaxSupLoss,
    label_smoothing_cross_entropy,
    maxsup_alpha,
    maxsup_cross_entropy,
)

__all__ = [
    "ELRLoss",
    "GeneralizedCrossEntropy",
    "LabelSmoothingCrossEntropy",
    "MaxSupLoss",
    "MeanAbsoluteError",
    "NCEandMAE",
    "NCEandRCE",
    "NormalizedCrossEntropy",
    "ReverseCrossEntropy",
    "SymmetricCrossEntropy",
    "elr_regularizer",
    "elr_update",
    "generalized_cross_entropy",
    "label_smoothing_cross_entropy",
    "maxsup_alpha",
    "maxsup_cross_entropy",
    "mean_absolute_error",
    "nce_and_mae",
    "nce_and_rce",
    "normalized_cross_entropy",
    "reverse_cross_entropy",
    "symmetric_cross_entropy",
]
