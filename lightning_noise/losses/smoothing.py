"""Cross-entropy with label smoothing and MaxSup, both with an optional z-loss.

* Label smoothing (Szegedy et al., CVPR 2016, "Rethinking the Inception Architecture"): the
  target is ``(1 - eps) * onehot(y) + eps / C``, so the loss is
  ``(1 - eps) * CE + eps * mean_k(-log p_k)``, exactly PyTorch's
  ``cross_entropy(..., label_smoothing=eps)``.
* MaxSup (Zhou et al., NeurIPS 2025, "MaxSup: Overcoming Representation Collapse in Label
  Smoothing", arXiv:2502.15798; official code ``ZhouYuxuanYX/Maximum-Suppression-
  Regularization``): label smoothing equals ``CE + eps * (z_y - mean_k z_k)`` on logits;
  MaxSup penalises the top-1 logit instead of the ground-truth one:
  ``CE + alpha * (z_max - mean_k z_k)``. The official code ramps ``alpha`` linearly from
  0.1 to 0.2 over training: ``alpha = 0.1 + 0.1 * epoch / (epochs - 1)``.
* z-loss: ``z_loss * logsumexp(z) ** 2`` added per entry, which keeps the log-partition
  near 0 (PaLM, Chowdhery et al. 2022).

Shapes, ``ignore_index`` and reductions follow :mod:`lightning_noise.losses._common`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noise import kernels
from lightning_noise.losses._common import (
    check_number,
    check_reduction,
    flatten,
    reduce,
    z_loss_term,
)

__all__ = [
    "LabelSmoothingCrossEntropy",
    "MaxSupLoss",
    "label_smoothing_cross_entropy",
    "maxsup_alpha",
    "maxsup_cross_entropy",
]


def label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    smoothing: float = 0.1,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """Cross-entropy against the smoothed target ``(1 - smoothing) * onehot + smoothing / C``.

    With ``smoothing=0`` it is plain cross-entropy. ``z_loss > 0`` adds
    ``z_loss * logsumexp(logits) ** 2`` per entry. ``impl`` chooses the fused kernel
    (:func:`lightning_noise.kernels.cross_entropy`) or the PyTorch code here (see
    :func:`_use_kernel`).

    Example:
        >>> import torch
        >>> z, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
        >>> a = label_smoothing_cross_entropy(z, y, 0.1)
        >>> b = F.cross_entropy(z, y, label_smoothing=0.1)
        >>> bool(torch.isclose(a, b))
        True
    """
    smoothing = check_number("smoothing", smoothing, low=0.0, high=1.0)
    z_loss = check_number("z_loss", z_loss, low=0.0)
    reduction = check_reduction(reduction)
    if _use_kernel(impl, logits):
        return kernels.cross_entropy(
            logits,
            target,
            ignore_index=ignore_index,
            label_smoothing=smoothing,
            z_loss=z_loss,
            reduction=reduction,
            impl=impl,
        )
    flat, y, valid = flatten(logits, target, ignore_index)
    log_p = flat.log_softmax(dim=-1)
    nll = -log_p.gather(1, y[:, None]).squeeze(1)
    loss = nll if smoothing == 0.0 else (1 - smoothing) * nll - smoothing * log_p.mean(dim=-1)
    if z_loss:
        loss = loss + z_loss * z_loss_term(flat)
    return reduce(loss, valid, reduction, target.shape)


def maxsup_cross_entropy(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """MaxSup: ``CE + alpha * (max_k z_k - mean_k z_k)`` on the logits (Zhou et al. 2025).

    The penalty is on the top-1 logit whether or not it is the ground truth; its gradient
    flows to the arg-max logit (``1 - 1/C``) and to every logit (``-1/C``).

    Example:
        >>> import torch
        >>> z, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([1])
        >>> ce = F.cross_entropy(z, y)
        >>> round(float(maxsup_cross_entropy(z, y, 0.1) - ce), 4)  # 0.1 * (2 - 1/3)
        0.1667
    """
    alpha = check_number("alpha", alpha, low=0.0)
    z_loss = check_number("z_loss", z_loss, low=0.0)
    reduction = check_reduction(reduction)
    if _use_kernel(impl, logits):
        return kernels.cross_entropy(
            logits,
            target,
            ignore_index=ignore_index,
            maxsup_alpha=alpha,
            z_loss=z_loss,
            reduction=reduction,
            impl=impl,
        )
    flat, y, valid = flatten(logits, target, ignore_index)
    nll = F.cross_entropy(flat, y, reduction="none")
    loss = nll
    if alpha:  # left out at 0, not multiplied by it: a -inf logit makes the penalty inf
        loss = loss + alpha * (flat.max(dim=-1).values - flat.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * z_loss_term(flat)
    return reduce(loss, valid, reduction, target.shape)


def _use_kernel(impl: str, logits: Tensor) -> bool:
    """Whether to run the fused kernel: ``impl="triton"`` always (it fails clearly where it
    cannot run), ``"auto"`` when :func:`~lightning_noise.kernels.resolve_impl` picks Triton
    for these logits and their dtype is one the kernel takes, ``"torch"`` never (the code
    here, which also takes float64)."""
    if not isinstance(logits, Tensor):
        return False  # the checks of the PyTorch code say what is wrong
    if impl == "auto" and logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return kernels.resolve_impl(impl, logits) == "triton"


def maxsup_alpha(epoch: int, num_epochs: int, start: float = 0.1, end: float = 0.2) -> float:
    """The official linear ramp: ``start + (end - start) * epoch / (num_epochs - 1)``.

    Example:
        >>> [round(maxsup_alpha(e, 5), 3) for e in range(5)]
        [0.1, 0.125, 0.15, 0.175, 0.2]
    """
    if num_epochs <= 1:
        return end
    return start + (end - start) * min(max(epoch, 0), num_epochs - 1) / (num_epochs - 1)


class LabelSmoothingCrossEntropy(nn.Module):
    """Module form of :func:`label_smoothing_cross_entropy` (``smoothing=0``: plain CE).

    Args:
        smoothing: The label-smoothing ``eps`` in ``[0, 1]``.
        z_loss: Weight of the z-loss, >= 0 (PaLM used 1e-4).
        ignore_index: Target value that is ignored.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        impl: ``"auto"``, ``"triton"`` (the fused kernel) or ``"torch"``.
    """

    def __init__(
        self,
        smoothing: float = 0.1,
        *,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.smoothing = check_number("smoothing", smoothing, low=0.0, high=1.0)
        self.z_loss = check_number("z_loss", z_loss, low=0.0)
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)
        self.impl = kernels.check_impl(impl)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return label_smoothing_cross_entropy(
            logits,
            target,
            self.smoothing,
            z_loss=self.z_loss,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, z_loss={self.z_loss}, reduction={self.reduction!r}"


class MaxSupLoss(nn.Module):
    """Module form of :func:`maxsup_cross_entropy` with the official ``alpha`` ramp.

    ``alpha`` goes linearly from ``alpha`` to ``alpha_end`` over training (official: 0.1 to
    0.2); ``alpha_end=None`` keeps it constant. :meth:`set_progress` sets the current epoch;
    :class:`~lightning_noise.models.ImageClassifier` calls it at the start of every training
    epoch with Lightning's epoch and ``max_epochs``, so the schedule needs no state of its own.

    Args:
        alpha: The weight at the first epoch, >= 0.
        alpha_end: The weight at the last epoch, or ``None`` for a constant weight.
        z_loss: Weight of the z-loss, >= 0.
        ignore_index: Target value that is ignored.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        impl: ``"auto"``, ``"triton"`` (the fused kernel) or ``"torch"``.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        alpha_end: float | None = 0.2,
        *,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.alpha_start = check_number("alpha", alpha, low=0.0)
        self.alpha_end = (
            None if alpha_end is None else check_number("alpha_end", alpha_end, low=0.0)
        )
        self.z_loss = check_number("z_loss", z_loss, low=0.0)
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)
        self.impl = kernels.check_impl(impl)
        self.alpha = self.alpha_start

    def set_progress(self, epoch: int, num_epochs: int | None) -> None:
        """Set ``alpha`` for 0-based ``epoch`` of ``num_epochs``.

        Raises:
            ValueError: when the ramp needs a number of epochs and ``num_epochs`` is unknown.
        """
        if self.alpha_end is None:
            return
        if num_epochs is None or num_epochs < 1:
            raise ValueError(
                "MaxSupLoss ramps alpha over the training epochs, but the number of epochs is "
                f"unknown (max_epochs={num_epochs}); set the Trainer's max_epochs, or use "
                "alpha_end=None for a constant alpha"
            )
        self.alpha = maxsup_alpha(epoch, num_epochs, self.alpha_start, self.alpha_end)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return maxsup_cross_entropy(
            logits,
            target,
            self.alpha,
            z_loss=self.z_loss,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, alpha_end={self.alpha_end}, z_loss={self.z_loss}"
