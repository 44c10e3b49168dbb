"""``nn.Module`` forms of the kernels, drop-in for ``nn.Softmax`` and ``nn.CrossEntropyLoss``.

:class:`FusedSoftmax` and :class:`FusedCrossEntropyLoss` keep PyTorch's modules' semantics
(``dim``; class dimension 1 for inputs of more than two dimensions, ``ignore_index``,
``label_smoothing``, ``reduction``) and run :func:`~lightning_noise.kernels.softmax` and
:func:`~lightning_noise.kernels.cross_entropy`. What the fused cross-entropy does not take
(class weights, probability targets, float64) is refused at construction or, for a call's
own inputs, handed to PyTorch's function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noise.kernels._dispatch import check_impl
from lightning_noise.kernels.cross_entropy import cross_entropy
from lightning_noise.kernels.softmax import softmax

__all__ = ["FusedCrossEntropyLoss", "FusedSoftmax"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FusedSoftmax(nn.Module):
    """``nn.Softmax(dim)`` through the online-normaliser kernel.

    Example:
        >>> x = torch.randn(2, 5)
        >>> torch.allclose(FusedSoftmax(dim=1, impl="torch")(x), nn.Softmax(dim=1)(x))
        True
    """

    def __init__(self, dim: int | None = -1, impl: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.impl = check_impl(impl)

    @classmethod
    def from_module(cls, module: nn.Softmax, impl: str = "auto") -> FusedSoftmax:
        return cls(dim=module.dim, impl=impl)

    def forward(self, x: Tensor) -> Tensor:
        if self.dim is None or x.dtype not in _KERNEL_DTYPES:
            return F.softmax(x, dim=self.dim)  # PyTorch's legacy implicit dim, or float64
        return softmax(x, dim=self.dim, impl=self.impl)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, impl={self.impl!r}"


class FusedCrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` (no class weights) through the fused cross-entropy kernel.

    Logits are ``[N, C]`` or ``[N, C, d1, ...]`` as in PyTorch; the class dimension is moved
    last for the kernel (a view; the kernel copies only if the classes are then strided).
    Probability targets and float64 logits go to :func:`torch.nn.functional.cross_entropy`.
    Unlike PyTorch, a ``"mean"`` over targets that are all ignored is 0, not NaN.

    Example:
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
        >>> a = FusedCrossEntropyLoss(label_smoothing=0.1, impl="torch")(x, y)
        >>> bool(torch.isclose(a, nn.CrossEntropyLoss(label_smoothing=0.1)(x, y)))
        True
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.impl = check_impl(impl)

    @classmethod
    def from_module(cls, module: nn.CrossEntropyLoss, impl: str = "auto") -> FusedCrossEntropyLoss:
        """The fused equivalent of ``module``; ``ValueError`` if it has class weights."""
        if getattr(module, "weight", None) is not None:
            raise ValueError("the fused cross-entropy does not take class weights")
        return cls(module.ignore_index, module.reduction, module.label_smoothing, impl)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.is_floating_point() or logits.dtype not in _KERNEL_DTYPES or logits.dim() < 2:
            return F.cross_entropy(
                logits,
                target,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )
        classes_last = logits.movedim(1, -1) if logits.dim() > 2 else logits
        return cross_entropy(
            classes_last,
            target,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, impl={self.impl!r}"
        )
