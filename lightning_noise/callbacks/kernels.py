"""``KernelSwap``: the fused Triton softmax and cross-entropy swapped in for the model's own.

At ``setup`` the callback walks the LightningModule and

* replaces every ``nn.Softmax`` with :class:`~lightning_noise.kernels.FusedSoftmax`;
* replaces every ``nn.CrossEntropyLoss`` (the criterion of
  :class:`~lightning_noise.models.ImageClassifier` by default) with
  :class:`~lightning_noise.kernels.FusedCrossEntropyLoss`, keeping its ``ignore_index``,
  ``label_smoothing`` and ``reduction``;
* sets ``impl`` on our :class:`~lightning_noise.losses.LabelSmoothingCrossEntropy` and
  :class:`~lightning_noise.losses.MaxSupLoss`, which then run the fused kernel.

It leaves alone what no kernel computes the same way (a cross-entropy with class weights, a
subclass of PyTorch's modules), and says so. The replacements hold no parameters or buffers,
so checkpoints are the same with and without the swap. Under ``impl="auto"`` the kernels run
in Triton on CUDA and in PyTorch on the CPU (unless ``TRITON_INTERPRET=1``); the callback
reports which. Functional calls (``F.softmax``, ``F.cross_entropy`` inside ``forward``) are
not modules and cannot be swapped: call :func:`lightning_noise.kernels.cross_entropy` there.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_noise import kernels
from lightning_noise.kernels.modules import FusedCrossEntropyLoss, FusedSoftmax
from lightning_noise.losses import LabelSmoothingCrossEntropy, MaxSupLoss

__all__ = ["KernelSwap"]


class KernelSwap(pl.Callback):
    """Swap the fused kernels in for ``nn.Softmax`` and the cross-entropy criterion.

    Args:
        softmax: Replace ``nn.Softmax`` modules.
        cross_entropy: Replace ``nn.CrossEntropyLoss`` modules and switch our label-smoothing
            and MaxSup losses to the kernel.
        impl: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.

    After setup, :attr:`replaced` maps each module name to what replaced it, :attr:`skipped`
    each module left alone to the reason, and :attr:`backend` says what runs the kernels.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))
        >>> swap = KernelSwap()
        >>> swap.swap(model)
        {'1': 'Softmax -> FusedSoftmax'}
    """

    def __init__(self, softmax: bool = True, cross_entropy: bool = True, impl: str = "auto"):
        super().__init__()
        kernels.check_impl(impl)
        if not (softmax or cross_entropy):
            raise ValueError("KernelSwap with softmax=False and cross_entropy=False does nothing")
        self.softmax = bool(softmax)
        self.cross_entropy = bool(cross_entropy)
        self.impl = impl
        self.replaced: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.backend: str | None = None

    def swap(self, model: nn.Module) -> dict[str, str]:
        """Swap the kernels into ``model`` in place; returns the new replacements."""
        new: dict[str, str] = {}
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                replacement = self._replacement(name, child)
                if replacement is None:
                    continue
                if replacement is child:
                    new[name] = f"{type(child).__name__} -> impl={self.impl!r}"
                else:
                    setattr(parent, child_name, replacement)
                    new[name] = f"{type(child).__name__} -> {type(replacement).__name__}"
        self.replaced.update(new)
        return new

    def _replacement(self, name: str, module: nn.Module) -> nn.Module | None:
        kind = type(module)
        if self.softmax and kind is nn.Softmax:
            return FusedSoftmax.from_module(module, impl=self.impl)
        if not self.cross_entropy:
            return None
        if kind is nn.CrossEntropyLoss:
            if module.weight is not None:
                self.skipped[name] = "CrossEntropyLoss with class weights (no fused kernel)"
                return None
            return FusedCrossEntropyLoss.from_module(module, impl=self.impl)
        if kind in (LabelSmoothingCrossEntropy, MaxSupLoss):
            module.impl = self.impl
            return module
        if isinstance(module, nn.Softmax | nn.CrossEntropyLoss):
            self.skipped[name] = f"{kind.__name__} subclasses PyTorch's module; left unchanged"
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.swap(pl_module)
        if not self.replaced:
            rank_zero_warn(
                "KernelSwap found no nn.Softmax or cross-entropy criterion module to replace; "
                "the model runs unchanged" + (f" (skipped: {self.skipped})" if self.skipped else "")
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = next(pl_module.parameters(), None)
        if probe is None or not self.replaced:
            return
        self.backend = kernels.resolve_impl(self.impl, probe)
        lines = ", ".join(f"{k}: {v}" for k, v in self.replaced.items())
        skipped = f"; left unchanged: {self.skipped}" if self.skipped else ""
        rank_zero_info(f"KernelSwap ({self.backend}): {lines}{skipped}")
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {"kernel_swap/backend": self.backend, "kernel_swap/replaced": lines}
            )
