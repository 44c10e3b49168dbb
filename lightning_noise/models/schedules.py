"""LR schedules of the noisy-label papers that ``torch.optim.lr_scheduler`` lacks.

Each is an ordinary ``LRScheduler``, stepped once per epoch (``ImageClassifier`` steps its
scheduler at every epoch's end), so a recipe names it like any torch scheduler::

    scheduler:
      class_path: lightning_noise.models.schedules.LinearDecayWithBeta1Switch
      init_args: {total_epochs: 200, decay_start: 80}

The others the papers use are torch's own: ELR's
``CosineAnnealingWarmRestarts(T_0=10, eta_min=1e-3)`` and Late Stopping's final-run
``MultiStepLR([10, 20, 40, 60, 80], gamma=0.5)`` (given to ``LateStopping(final_scheduler=...)``).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_noise._validate import check_int, check_number

__all__ = ["LinearDecayWithBeta1Switch"]


class LinearDecayWithBeta1Switch(LRScheduler):
    """Co-teaching's Adam schedule (Han et al., NeurIPS 2018; official ``main.py``).

    Constant LR until epoch ``decay_start``, then a linear decay towards 0 at
    ``total_epochs``; from ``decay_start`` on, Adam's ``beta1`` is ``beta1_after`` (the
    official 0.9 -> 0.1). The official code builds two lists and sets, at the start of epoch
    ``i``::

        lr[i]    = base_lr                                                  for i < decay_start
                 = (total_epochs - i) / (total_epochs - decay_start) * base_lr  otherwise
        beta1[i] = 0.9 for i < decay_start, else 0.1     (beta2 unchanged)

    This scheduler gives the same values, bit for bit, at plan index
    ``i = epoch + epoch_offset`` (``epoch`` counts the scheduler's steps, i.e. Lightning's
    0-based epoch) and clamps the LR at 0 past ``total_epochs`` (the official lists end
    there). The official loop trains ``for epoch in range(1, n_epoch)``: 199 epochs that start
    at index 1. With ``epoch_offset=0`` (the default) the whole plan is one epoch later than
    the official run's, in step with Co-teaching's forget-rate ramp
    (:func:`~lightning_noise.functional.selection.coteaching_forget_rate`, see its note);
    ``epoch_offset=1`` with 199 epochs replays the official run's LRs.

    Args:
        optimizer: an optimizer whose parameter groups have ``betas`` (Adam, AdamW, ...); the
            ``beta1`` they start with is the one kept before ``decay_start``.
        total_epochs: the official ``n_epoch`` (200), where the LR would reach 0.
        decay_start: the official ``epoch_decay_start`` (80 for MNIST and CIFAR-10, 100 for
            CIFAR-100).
        beta1_after: Adam's ``beta1`` from ``decay_start`` on (official 0.1).
        epoch_offset: plan index of the first epoch (see above).
        last_epoch: torch's resume argument (``-1``: start).

    Example:
        >>> import torch
        >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.001)
        >>> sched = LinearDecayWithBeta1Switch(opt, total_epochs=200, decay_start=80)
        >>> for _ in range(100):  # one optimizer step and one scheduler step per epoch
        ...     opt.step()
        ...     sched.step()
        >>> round(opt.param_groups[0]["lr"], 8), opt.param_groups[0]["betas"]
        (0.00083333, (0.1, 0.999))
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_epochs: int = 200,
        decay_start: int = 80,
        beta1_after: float = 0.1,
        epoch_offset: int = 0,
        last_epoch: int = -1,
    ) -> None:
        self.total_epochs = check_int("total_epochs", total_epochs, minimum=1)
        self.decay_start = check_int("decay_start", decay_start, minimum=0)
        if self.decay_start >= self.total_epochs:
            raise ValueError(
                f"decay_start must be below total_epochs={total_epochs}, got {decay_start!r}"
            )
        self.beta1_after = check_number(
            "beta1_after", beta1_after, low=0.0, high=1.0, high_open=True
        )
        self.epoch_offset = check_int("epoch_offset", epoch_offset, minimum=0)
        for group in optimizer.param_groups:
            if "betas" not in group:
                raise ValueError(
                    f"LinearDecayWithBeta1Switch sets Adam's beta1, but "
                    f"{type(optimizer).__name__} has no `betas`; use torch.optim.Adam or AdamW "
                    "(or torch's LinearLR/LambdaLR for the LR decay alone)"
                )
        #: The beta1 of each group before ``decay_start`` (as configured).
        self.beta1_before = [float(group["betas"][0]) for group in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def plan_index(self) -> int:
        """The official plan's index of the current epoch."""
        return self.last_epoch + self.epoch_offset

    def lr_factor(self, index: int) -> float:
        """The official ``alpha_plan[index] / base_lr`` (``1`` before the decay)."""
        if index < self.decay_start:
            return 1.0
        return max(float(self.total_epochs - index), 0.0) / (self.total_epochs - self.decay_start)

    def get_lr(self) -> list[float]:
        index = self.plan_index()
        if index < self.decay_start:
            return list(self.base_lrs)
        # The official order of operations: float(n - i) / (n - start) * lr.
        return [self.lr_factor(index) * base for base in self.base_lrs]

    def step(self, epoch: Any = None) -> None:
        super().step(epoch)
        after = self.plan_index() >= self.decay_start
        for group, before in zip(self.optimizer.param_groups, self.beta1_before, strict=True):
            beta2 = group["betas"][1]
            group["betas"] = (self.beta1_after if after else before, beta2)
