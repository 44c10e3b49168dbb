"""Losses that are robust to label noise by construction.

With ``p = softmax(z)`` and ``p_y`` the probability of the given label:

* **GCE**, generalized cross-entropy (Zhang and Sabuncu, NeurIPS 2018, "Generalized Cross
  Entropy Loss for Training Deep Neural Networks with Noisy Labels"):
  ``(1 - p_y ** q) / q``; ``q -> 0`` is CE, ``q = 1`` is MAE; default ``q = 0.7``.
* **RCE**, reverse cross-entropy ``-sum_k p_k log y_k`` with ``log 0`` replaced by ``A``
  (Wang et al., ICCV 2019, "Symmetric Cross Entropy for Robust Learning with Noisy Labels"):
  ``-A * sum_{k != y} p_k``. The default ``log_zero`` (``A``) is the official code's: SCE's
  and APL's ``ReverseCrossEntropy`` clamp the one-hot label at 1e-4 before the log, i.e.
  ``A = ln(1e-4) = -9.21`` (:data:`OFFICIAL_LOG_ZERO`); APL's published tables come from that
  code. The SCE paper's text sets ``A = -4`` (:data:`PAPER_LOG_ZERO`): pass
  ``log_zero=-4.0`` for it. At the same ``beta`` the paper's RCE term is 2.30x smaller.
* **SCE**, symmetric cross-entropy: ``alpha * CE + beta * RCE`` (paper: alpha 0.1, beta 1.0
  on CIFAR-10; 6.0 and 0.1 on CIFAR-100).
* **NCE**, normalized cross-entropy (Ma et al., ICML 2020, "Normalized Loss Functions for
  Deep Learning with Noisy Labels"): ``-log p_y / -sum_k log p_k``.
* **MAE**: ``1 - p_y``, the form of the official Active-Passive Losses code (half the L1
  distance ``sum_k |p_k - y_k| = 2 - 2 p_y`` of the paper).
* **APL**, active-passive losses: ``alpha * NCE + beta * RCE`` and ``alpha * NCE + beta * MAE``
  (paper: alpha = beta = 1 on CIFAR-10; alpha 10, beta 0.1 on CIFAR-100).

As in the official codes, ``p`` is clamped to ``[1e-7, 1]`` inside GCE and RCE. Shapes,
``ignore_index`` and reductions follow :mod:`lightning_noise.losses._common`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noise.losses._common import check_number, check_reduction, flatten, reduce

__all__ = [
    "OFFICIAL_LOG_ZERO",
    "PAPER_LOG_ZERO",
    "GeneralizedCrossEntropy",
    "MeanAbsoluteError",
    "NCEandMAE",
    "NCEandRCE",
    "NormalizedCrossEntropy",
    "ReverseCrossEntropy",
    "SymmetricCrossEntropy",
    "generalized_cross_entropy",
    "mean_absolute_error",
    "nce_and_mae",
    "nce_and_rce",
    "normalized_cross_entropy",
    "reverse_cross_entropy",
    "symmetric_cross_entropy",
]

_P_MIN = 1e-7  # the official codes' clamp of the predicted probabilities

#: RCE's ``A`` (the value of ``log 0``) in the official SCE and APL code, the default: the
#: one-hot label is clamped to ``[1e-4, 1]`` before ``torch.log``, so ``A = ln(1e-4)``.
OFFICIAL_LOG_ZERO = math.log(1e-4)
#: RCE's ``A`` as the SCE paper's text sets it (Wang et al. 2019): ``A = -4``.
PAPER_LOG_ZERO = -4.0


# --------------------------------------------------------------------- per-entry forms
def _gce(flat: Tensor, y: Tensor, q: float) -> Tensor:
    p_y = flat.softmax(dim=-1).gather(1, y[:, None]).squeeze(1).clamp(_P_MIN, 1.0)
    return (1.0 - p_y.pow(q)) / q


def _rce(flat: Tensor, y: Tensor, log_zero: float) -> Tensor:
    p = flat.softmax(dim=-1).clamp(_P_MIN, 1.0)
    others = p.sum(dim=-1) - p.gather(1, y[:, None]).squeeze(1)
    return -log_zero * others


def _nce(flat: Tensor, y: Tensor) -> Tensor:
    if flat.shape[-1] < 2:
        raise ValueError(
            "the normalized cross-entropy needs at least 2 classes: with one class "
            f"-log p_y / -sum_k log p_k is 0 / 0 (logits have {flat.shape[-1]} class)"
        )
    log_p = flat.log_softmax(dim=-1)
    return log_p.gather(1, y[:, None]).squeeze(1) / log_p.sum(dim=-1)


def _mae(flat: Tensor, y: Tensor) -> Tensor:
    return 1.0 - flat.softmax(dim=-1).gather(1, y[:, None]).squeeze(1)


def _apply(
    per_entry: Callable[[Tensor, Tensor], Tensor],
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
) -> Tensor:
    reduction = check_reduction(reduction)
    flat, y, valid = flatten(logits, target, ignore_index)
    return reduce(per_entry(flat, y), valid, reduction, target.shape)


# --------------------------------------------------------------------- functional API
def generalized_cross_entropy(
    logits: Tensor, target: Tensor, q: float = 0.7, *, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:  # fmt: skip
    """GCE ``(1 - p_y ** q) / q`` (Zhang and Sabuncu 2018), ``q`` in ``(0, 1]``.

    Example:
        >>> import torch
        >>> z, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
        >>> round(float(generalized_cross_entropy(z, y, q=1.0)), 4)  # 1 - 0.5
        0.5
    """
    q = check_number("q", q, low=0.0, high=1.0, low_open=True)
    return _apply(lambda f, y: _gce(f, y, q), logits, target, ignore_index, reduction)


def reverse_cross_entropy(
    logits: Tensor, target: Tensor, *, log_zero: float = OFFICIAL_LOG_ZERO,
    ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:  # fmt: skip
    """RCE ``-log_zero * sum_{k != y} p_k`` (Wang et al. 2019; ``log_zero`` is their ``A``).

    ``log_zero`` defaults to the official code's ``ln(1e-4)`` (:data:`OFFICIAL_LOG_ZERO`); the
    paper's text uses ``-4`` (:data:`PAPER_LOG_ZERO`).

    Example:
        >>> import torch
        >>> z, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
        >>> round(float(reverse_cross_entropy(z, y)), 4)  # -ln(1e-4) * 0.5
        4.6052
        >>> round(float(reverse_cross_entropy(z, y, log_zero=PAPER_LOG_ZERO)), 4)  # 4 * 0.5
        2.0
    """
    log_zero = check_number("log_zero", log_zero, high=0.0, high_open=True)
    return _apply(lambda f, y: _rce(f, y, log_zero), logits, target, ignore_index, reduction)


def symmetric_cross_entropy(
    logits: Tensor, target: Tensor, alpha: float = 0.1, beta: float = 1.0, *,
    log_zero: float = OFFICIAL_LOG_ZERO, ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:  # fmt: skip
    """SCE ``alpha * CE + beta * RCE`` (Wang et al. 2019; CIFAR-10 defaults).

    RCE's ``log_zero`` defaults to the official code's ``ln(1e-4)``; ``-4.0`` is the paper's.
    """
    alpha = check_number("alpha", alpha, low=0.0)
    beta = check_number("beta", beta, low=0.0)
    log_zero = check_number("log_zero", log_zero, high=0.0, high_open=True)

    def sce(flat: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(flat, y, reduction="none")
        return alpha * ce + beta * _rce(flat, y, log_zero)

    return _apply(sce, logits, target, ignore_index, reduction)


def normalized_cross_entropy(
    logits: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """NCE ``-log p_y / -sum_k log p_k`` (Ma et al. 2020), in ``[0, 1]``."""
    return _apply(_nce, logits, target, ignore_index, reduction)


def mean_absolute_error(
    logits: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """MAE ``1 - p_y`` (the official Active-Passive Losses form)."""
    return _apply(_mae, logits, target, ignore_index, reduction)


def nce_and_rce(
    logits: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 1.0, *,
    log_zero: float = OFFICIAL_LOG_ZERO, ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:  # fmt: skip
    """APL ``alpha * NCE + beta * RCE`` (Ma et al. 2020; CIFAR-10 defaults).

    RCE's ``log_zero`` defaults to the official APL code's ``ln(1e-4)``.
    """
    alpha = check_number("alpha", alpha, low=0.0)
    beta = check_number("beta", beta, low=0.0)
    log_zero = check_number("log_zero", log_zero, high=0.0, high_open=True)
    return _apply(
        lambda f, y: alpha * _nce(f, y) + beta * _rce(f, y, log_zero),
        logits, target, ignore_index, reduction,
    )  # fmt: skip


def nce_and_mae(
    logits: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 1.0, *,
    ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:  # fmt: skip
    """APL ``alpha * NCE + beta * MAE`` (Ma et al. 2020; CIFAR-10 defaults)."""
    alpha = check_number("alpha", alpha, low=0.0)
    beta = check_number("beta", beta, low=0.0)
    return _apply(
        lambda f, y: alpha * _nce(f, y) + beta * _mae(f, y), logits, target, ignore_index,
        reduction,
    )  # fmt: skip


# --------------------------------------------------------------------- modules
class _RobustLoss(nn.Module):
    """Keeps ``ignore_index`` and ``reduction``; subclasses define :meth:`forward`."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)


class GeneralizedCrossEntropy(_RobustLoss):
    """Module form of :func:`generalized_cross_entropy`."""

    def __init__(self, q: float = 0.7, *, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.q = check_number("q", q, low=0.0, high=1.0, low_open=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return generalized_cross_entropy(
            logits, target, self.q, ignore_index=self.ignore_index, reduction=self.reduction
        )


class ReverseCrossEntropy(_RobustLoss):
    """Module form of :func:`reverse_cross_entropy`."""

    def __init__(
        self, *, log_zero: float = OFFICIAL_LOG_ZERO, ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.log_zero = check_number("log_zero", log_zero, high=0.0, high_open=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return reverse_cross_entropy(
            logits, target, log_zero=self.log_zero, ignore_index=self.ignore_index,
            reduction=self.reduction,
        )  # fmt: skip


class SymmetricCrossEntropy(_RobustLoss):
    """Module form of :func:`symmetric_cross_entropy`."""

    def __init__(
        self, alpha: float = 0.1, beta: float = 1.0, *, log_zero: float = OFFICIAL_LOG_ZERO,
        ignore_index: int = -100, reduction: str = "mean",
    ) -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.alpha = check_number("alpha", alpha, low=0.0)
        self.beta = check_number("beta", beta, low=0.0)
        self.log_zero = check_number("log_zero", log_zero, high=0.0, high_open=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return symmetric_cross_entropy(
            logits, target, self.alpha, self.beta, log_zero=self.log_zero,
            ignore_index=self.ignore_index, reduction=self.reduction,
        )  # fmt: skip


class NormalizedCrossEntropy(_RobustLoss):
    """Module form of :func:`normalized_cross_entropy`."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return normalized_cross_entropy(
            logits, target, ignore_index=self.ignore_index, reduction=self.reduction
        )


class MeanAbsoluteError(_RobustLoss):
    """Module form of :func:`mean_absolute_error`."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return mean_absolute_error(
            logits, target, ignore_index=self.ignore_index, reduction=self.reduction
        )


class NCEandRCE(_RobustLoss):
    """Module form of :func:`nce_and_rce`."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 1.0, *, log_zero: float = OFFICIAL_LOG_ZERO,
        ignore_index: int = -100, reduction: str = "mean",
    ) -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.alpha = check_number("alpha", alpha, low=0.0)
        self.beta = check_number("beta", beta, low=0.0)
        self.log_zero = check_number("log_zero", log_zero, high=0.0, high_open=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return nce_and_rce(
            logits, target, self.alpha, self.beta, log_zero=self.log_zero,
            ignore_index=self.ignore_index, reduction=self.reduction,
        )  # fmt: skip


class NCEandMAE(_RobustLoss):
    """Module form of :func:`nce_and_mae`."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 1.0, *, ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.alpha = check_number("alpha", alpha, low=0.0)
        self.beta = check_number("beta", beta, low=0.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return nce_and_mae(
            logits, target, self.alpha, self.beta, ignore_index=self.ignore_index,
            reduction=self.reduction,
        )  # fmt: skip
