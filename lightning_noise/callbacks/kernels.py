"""``KernelSwap``: the fused Triton softmax and cross-entropy swapped in for the model's own.

At ``setup`` the callback walks the LightningModule and

* replaces every ``nn.Softmax`` with :class:`~lightning_noise.kernels.FusedSoftmax`;
* replaces every ``nn.CrossEntropyLoss`` (the criterion of
  :class:`~lightning_noise.models.ImageClassifier` by default) with
  :class:`~lightning_noise.kernels.FusedCrossEntropyLoss`, keeping its ``ignore_index``,
  ``label_smoothing`` and ``reduction``;
* sets ``impl`` on our :class:`~lightning_noise.losses.LabelSmoothingCrossEntropy` and
  :class:`~lightning_noise.losses.MaxSupLoss`, which then run the fused kernel;
* wraps every loss *function* held as a ``loss_function`` attribute (a Hugging Face model's,
  or any module's) in :class:`~lightning_noise.functional.lm_head.RoutedLoss`: the
  ``F.cross_entropy`` calls it makes run the fused kernel;
* with ``fused_head=True``, joins a causal LM's output embedding and its loss
  (:class:`~lightning_noise.functional.lm_head.FusedLMHead`, the kernel
  :func:`~lightning_noise.kernels.linear_cross_entropy`): the ``[B, T, V]`` logits never
  exist. It is found by structure: a module that defines transformers' ``ForCausalLMLoss`` as
  its ``loss_function`` and has an ``nn.Linear`` output embedding (any Hugging Face causal LM
  whose logits go straight from the head to that loss, which a random probe checks), and any
  module with an ``enable_fused_head(impl)`` method
  (:class:`~lightning_noise.models.CausalLMModule`). While a Hugging Face model trains and is
  given ``labels``, its output ``logits`` are then empty (``[B, 0, V]``); call it without
  labels, or in eval mode, for logits.

It leaves alone what no kernel computes the same way (a cross-entropy with class weights, a
subclass of PyTorch's modules), and says so. The replacements hold no parameters or buffers,
so checkpoints are the same with and without the swap. Under ``impl="auto"`` the kernels run
in Triton on CUDA and in PyTorch on the CPU (unless ``TRITON_INTERPRET=1``); the callback
reports which. Functional calls (``F.softmax``, ``F.cross_entropy`` inside ``forward``) are
not modules and cannot be swapped unless a ``loss_function`` attribute makes them: call
:func:`lightning_noise.kernels.cross_entropy` there.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_noise import kernels
from lightning_noise.functional.lm_head import (
    FusedLMHead,
    RoutedLoss,
    find_lm_head,
    has_loss_function,
    is_causal_lm_loss,
)
from lightning_noise.kernels.modules import FusedCrossEntropyLoss, FusedSoftmax
from lightning_noise.losses import LabelSmoothingCrossEntropy, MaxSupLoss
from lightning_noise.types import LossTransform, find_callbacks

__all__ = ["KernelSwap"]


class KernelSwap(pl.Callback):
    """Swap the fused kernels in for ``nn.Softmax`` and the cross-entropy criterion.

    Args:
        softmax: Replace ``nn.Softmax`` modules.
        cross_entropy: Replace ``nn.CrossEntropyLoss`` modules, switch our label-smoothing
            and MaxSup losses to the kernel, and route the ``F.cross_entropy`` calls of every
            ``loss_function`` attribute (a Hugging Face model's loss) to it.
        impl: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        fused_head: Also fuse a causal LM's output embedding and loss (see the module
            docstring); a model that has none is reported in :attr:`skipped`, and
            ``fused_head=True`` that fuses nothing raises at setup, as does a fused head
            with NoiseFiT (whose hybrid loss needs the logits).

    After setup, :attr:`replaced` maps each module name to what replaced it, :attr:`skipped`
    each module left alone to the reason, and :attr:`backend` says what runs the kernels.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))
        >>> swap = KernelSwap()
        >>> swap.swap(model)
        {'1': 'Softmax -> FusedSoftmax'}
    """

    def __init__(
        self,
        softmax: bool = True,
        cross_entropy: bool = True,
        impl: str = "auto",
        fused_head: bool = False,
    ):
        super().__init__()
        kernels.check_impl(impl)
        if not (softmax or cross_entropy or fused_head):
            raise ValueError(
                "KernelSwap with softmax=False, cross_entropy=False and fused_head=False does "
                "nothing"
            )
        self.softmax = bool(softmax)
        self.cross_entropy = bool(cross_entropy)
        self.fused_head = bool(fused_head)
        self.impl = impl
        self.fused: dict[str, Any] = {}  # module name -> FusedLMHead, or the module itself
        self.replaced: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.backend: str | None = None

    def swap(self, model: nn.Module) -> dict[str, str]:
        """Swap the kernels into ``model`` in place; returns the new replacements."""
        new: dict[str, str] = {}
        if self.fused_head:
            new.update(self._fuse_heads(model))
        if self.cross_entropy:
            new.update(self._route_loss_functions(model))
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

    def _fuse_heads(self, model: nn.Module) -> dict[str, str]:
        new: dict[str, str] = {}
        owners: list[str] = []  # modules that fuse their own head: their submodules are theirs
        for name, module in model.named_modules():
            if any(o == "" or name.startswith(f"{o}.") for o in owners):
                continue
            if name in self.fused:  # swapped at an earlier setup (fit, then test)
                owners.append(name)
                continue
            label = name or type(module).__name__
            enable = getattr(module, "enable_fused_head", None)
            if callable(enable):
                enable(self.impl)
                self.fused[name] = module
                owners.append(name)
                new[label] = f"{type(module).__name__}.enable_fused_head(impl={self.impl!r})"
                continue
            if not (has_loss_function(module) and find_lm_head(module) is not None):
                continue
            if not is_causal_lm_loss(module.loss_function):
                self.skipped[label] = (
                    f"fused head: loss_function {module.loss_function!r} is not transformers' "
                    "ForCausalLMLoss"
                )
                continue
            try:
                self.fused[name] = FusedLMHead(module, self.impl)
            except ValueError as err:
                self.skipped[label] = f"fused head: {err}"
                continue
            owners.append(name)
            head = type(find_lm_head(module)).__name__
            new[label] = f"{head} head + ForCausalLMLoss -> linear_cross_entropy"
        return new

    def _route_loss_functions(self, model: nn.Module) -> dict[str, str]:
        new: dict[str, str] = {}
        for name, module in model.named_modules():
            if not has_loss_function(module) or name in self.fused:
                continue  # a fused head's loss routes its unfused calls itself
            fn = module.loss_function
            getter = getattr(module, "get_output_embeddings", None)
            if is_causal_lm_loss(fn) and callable(getter) and getter() is None:
                continue  # a Hugging Face base model: it inherits loss_function but has no head
            if isinstance(fn, nn.Module) or isinstance(fn, RoutedLoss) or not callable(fn):
                continue  # a loss module is swapped below, by type
            module.loss_function = RoutedLoss(fn, self.impl)
            label = name or type(module).__name__
            new[label] = f"loss_function {getattr(fn, '__name__', type(fn).__name__)} -> routed"
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
        if self.fused_head and not self.fused:
            raise ValueError(
                f"KernelSwap(fused_head=True) found no causal LM head to fuse in "
                f"{type(pl_module).__name__} (a module defining transformers' ForCausalLMLoss "
                "as loss_function with an nn.Linear output embedding, or one with "
                f"enable_fused_head); skipped: {self.skipped or 'nothing'}. Use "
                "fused_head=False"
            )
        if self.fused and find_callbacks(trainer, LossTransform):
            raise ValueError(
                "NoiseFiT needs the model's logits, which the fused head + loss never makes "
                "(KernelSwap(fused_head=True) fused "
                f"{sorted(k or type(pl_module).__name__ for k in self.fused)}); use "
                "KernelSwap(fused_head=False) with NoiseFiT"
            )
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
