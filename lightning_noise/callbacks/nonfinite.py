"""The library's non-finite policy as a callback: skip a step with a non-finite gradient, say so,
and stop a run that keeps producing them.

A NaN or inf gradient (from a NaN input, an overflowing loss, a diverging learning rate)
silently poisons the weights: the optimizer step writes it into every parameter it touches,
and every number printed afterwards comes from a broken run. :class:`NonFiniteGuard`
checks the gradients that are about to be applied (after SAM has replaced them, after the
grad scaler has unscaled them) with one fused check per step, and when any is not finite:

1. skips the optimizer step (the gradients are set to ``None``, which every PyTorch optimizer
   skips: no update, no momentum or weight-decay change);
2. counts it: :attr:`skipped_steps` (logged every step as ``train/skipped_steps``) and
   :attr:`consecutive`; it warns once, on the first skip;
3. after ``max_consecutive`` skips in a row, stops training with an error that says what to
   try.

Under ``16-mixed`` the grad scaler already skips overflowing steps while it calibrates its
scale; they are counted here too (and a handful in a row at the start is normal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_noise._validate import check_int
from lightning_noise.callbacks.composition import check_gradient_strategy
from lightning_noise.functional._sharding import local, reduce_groups, sum_over_shards

__all__ = ["NonFiniteGuard", "all_finite"]


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: whether every element of every tensor is finite (one reduction on
    the device; reading it is the step's one host synchronisation)."""
    if not tensors:
        return torch.tensor(True)
    groups = [reduce_groups(t) for t in tensors]
    blocks = [local(t) for t in tensors]
    device = blocks[0].device
    if not any(groups):
        return torch.stack([t.isfinite().all().to(device) for t in blocks]).all()
    # FSDP2: each rank holds a shard; count the non-finite entries over all shards, so that
    # every rank reaches the same verdict and skips the same steps.
    bad = [t.isfinite().logical_not_().sum().to(device) for t in blocks]
    return sum_over_shards(bad, groups) == 0


class NonFiniteGuard(Callback):
    """Skip optimizer steps whose gradient is not finite; stop after too many in a row.

    List it after SAM/ASAM/FSAM (which replace the gradient in the same hook; SAM refuses the
    other order at setup). Under DDP the gradients are all-reduced before this hook, so every
    rank sees the same verdict and skips the same steps; under FSDP2 (``ModelParallelStrategy``)
    the count of non-finite entries is all-reduced over the shards for the same reason.
    DeepSpeed and FSDP1 are refused at setup (their gradients are not the parameters' ``.grad``).

    Args:
        max_consecutive: Skipped steps in a row after which training stops with an error,
            >= 1.

    Example:
        >>> guard = NonFiniteGuard(max_consecutive=5)
        >>> guard.skipped_steps, guard.consecutive
        (0, 0)
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = check_int("max_consecutive", max_consecutive, minimum=1)
        #: Optimizer steps skipped so far for a non-finite gradient.
        self.skipped_steps = 0
        #: Skipped steps in a row, up to the current one.
        self.consecutive = 0
        self._warned = False

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_gradient_strategy("NonFiniteGuard", "NonFiniteGuard", trainer.strategy)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        # The one host read of this callback, deliberately every step (issue 14): whether the
        # optimizer steps is decided on the host, as GradScaler.step reads its found_inf. One
        # fused check over all gradients, so one sync a step.
        if bool(all_finite(grads)):
            self.consecutive = 0
        else:
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self.consecutive += 1
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"NonFiniteGuard: the gradient at global step {trainer.global_step} is not "
                    "finite; the optimizer step was skipped (counted in train/skipped_steps; "
                    "this warning is shown once)"
                )
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"NonFiniteGuard: {self.consecutive} optimizer steps in a row had a non-finite "
                f"gradient (up to global step {trainer.global_step}; {self.skipped_steps} "
                "skipped in all), so training stopped. Check the inputs for NaN/inf, lower the "
                "learning rate, enable gradient clipping (`gradient_clip_val`), or use "
                "precision='bf16-mixed' instead of '16-mixed'"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
