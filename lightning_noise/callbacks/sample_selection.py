"""Small-loss sample selection: Co-teaching's small-loss trick and Adaptive-k, as callbacks.

Both methods train on the samples of each mini-batch whose loss is small, on the evidence
that deep networks fit clean labels before noisy ones (so early in training a noisy-labelled
sample tends to have a large loss):

* :class:`SmallLossSelection` keeps a **fixed fraction** ``1 - R(T)`` of each mini-batch, the
  samples with the smallest loss, with Co-teaching's forget-rate schedule ``R(T)`` (Han et
  al., "Co-teaching: Robust Training of Deep Neural Networks with Extremely Noisy Labels",
  NeurIPS 2018), applied to one network.
* :class:`AdaptiveK` keeps the samples whose loss is below an **adaptive threshold** built
  from Adam-style moving averages of the mini-batch mean loss (Dedeoglu, Kesgin, Amasyali,
  "A Robust Optimization Method for Label Noisy Datasets Based on Adaptive Threshold:
  Adaptive-k", arXiv:2203.14165; Frontiers of Computer Science 2024). It needs no noise rate.

The trainer-free core is :mod:`lightning_noise.functional.selection`. The callbacks are
:class:`~lightning_noise.callbacks.SamplePolicyCallback` subclasses: a LightningModule that
uses :class:`~lightning_noise.mixins.PerSampleLossMixin` asks them for 0/1 weights inside
``self.reduce_loss``, and the loss becomes the mean over the kept samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_noise._validate import check_int
from lightning_noise.callbacks.policy import SamplePolicyCallback
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.dynamics.noise_rate import (
    ESTIMATE,
    NOISE_RATE_KEY,
    NoiseRateEstimate,
    default_estimate_until,
    estimated_forget_rate,
    needs_dynamics_message,
)
from lightning_noise.functional.selection import (
    AdaptiveKState,
    adaptive_k_threshold,
    adaptive_k_update,
    check_schedule,
    check_schedule_offset,
    coteaching_forget_rate,
    num_kept,
    small_loss_mask,
)
from lightning_noise.types import SampleBatch, find_callback

__all__ = [
    "AdaptiveK",
    "SmallLossSelection",
    "adaptive_k_threshold",
    "adaptive_k_update",
    "coteaching_forget_rate",
    "num_kept",
    "small_loss_mask",
]


class SmallLossSelection(SamplePolicyCallback):
    """Train on the small-loss fraction of each mini-batch (Co-teaching, Han et al. 2018).

    Co-teaching's small-loss trick applied to one network ("Co-teaching: Robust Training of
    Deep Neural Networks with Extremely Noisy Labels", NeurIPS 2018; official code
    ``bhanML/Co-teaching``). At epoch ``T`` (``trainer.current_epoch``, 0-based) the
    ``num_kept(B, R(T)) = int((1 - R(T)) * B)`` samples of each mini-batch of ``B`` with the
    smallest loss get weight 1 and the others 0, so the training loss is their mean. The
    forget rate ``R(T)`` follows the official schedule (see :func:`coteaching_forget_rate`):
    0 at epoch 0, a linear ramp to ``forget_rate ** exponent`` at epoch ``num_gradual - 1``,
    ``forget_rate`` afterwards, read at ``T + schedule_offset`` (default 0: one epoch later
    than the official loop, whose first training epoch is its epoch 1). At least one sample
    is always kept. Ties are broken by position in the batch. The current ``R(T)`` is logged
    as ``small_loss/forget_rate``; the mixin logs ``train/kept_fraction``.

    Differences from Co-teaching itself: one network selects for itself (Co-teaching's two
    networks select for each other, which is what protects it from its own confirmation bias),
    and the official loss divides the mean by ``num_remember`` a second time (an accidental
    learning-rate scale of ``1 / num_remember``) which is not reproduced.

    Under DDP each rank selects within its own per-device batch: the per-device batch is the
    paper's mini-batch (``B`` is the per-device batch size), and the kept fraction is the same
    on every rank. The gradient all-reduce then averages the ranks' means over their kept
    samples, so every replica takes the same step.

    Outside the training loop (validation, test) every sample is kept.

    Args:
        forget_rate: ``tau``, the final fraction of each mini-batch dropped, in ``[0, 1)``.
            Co-teaching sets it to the (estimated) noise rate.
        num_gradual: ``T_k``, the epochs of the linear ramp, >= 1 (Co-teaching: 10; "can be
            5, 10, 15").
        exponent: ``c``, > 0 (Co-teaching: 1; "can be 0.5, 1, 2"); see
            :func:`coteaching_forget_rate` for how the official code applies it.
        schedule_offset: added to ``trainer.current_epoch`` before the schedule is read. 0
            (default): epoch 0 keeps every sample (the paper's Algorithm 1), one epoch later
            than the official run. 1: epochs counted as the official training loop counts
            them (``range(1, n_epoch)``), so the first epoch already drops
            ``tau / (T_k - 1)``.

    Raises:
        ValueError: for bad hyperparameters (in ``__init__``).
        RuntimeError: at ``setup`` when the module has no ``reduce_loss``
            (:class:`~lightning_noise.mixins.PerSampleLossMixin`), and at the end of a
            training epoch in which the module never called it.

    Example:
        >>> selection = SmallLossSelection(forget_rate=0.4, num_gradual=10)
        >>> round(selection.forget_rate_at(5), 4), selection.forget_rate_at(10)
        (0.2222, 0.4)
        >>> trainer = pl.Trainer(callbacks=[selection], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        forget_rate: float | str,
        num_gradual: int = 10,
        exponent: float = 1.0,
        schedule_offset: int = 0,
        estimate_until: int | None = None,
    ) -> None:
        super().__init__()
        estimated = forget_rate == ESTIMATE
        check_schedule(0.0 if estimated else forget_rate, num_gradual, exponent)
        self.forget_rate: float | str = ESTIMATE if estimated else float(forget_rate)
        self.num_gradual = num_gradual
        self.exponent = float(exponent)
        self.schedule_offset = check_schedule_offset(schedule_offset)
        #: The noise-rate estimate behind ``forget_rate="estimate"`` (``None`` otherwise).
        self.estimate: NoiseRateEstimate | None = None
        if estimated:
            until = default_estimate_until(num_gradual, self.schedule_offset)
            if estimate_until is not None:
                until = check_int("estimate_until", estimate_until, minimum=0)
            self.estimate = NoiseRateEstimate(until=until)
        elif estimate_until is not None:
            raise ValueError(
                f"estimate_until={estimate_until!r} is for forget_rate='estimate'; with "
                f"forget_rate={forget_rate!r} leave it None"
            )

    @property
    def state_key(self) -> str:
        extra = {"schedule_offset": self.schedule_offset} if self.schedule_offset else {}
        # The offset joins the key only when set, so checkpoints of earlier runs still load.
        return self._generate_state_key(
            forget_rate=self.forget_rate,
            num_gradual=self.num_gradual,
            exponent=self.exponent,
            **extra,
        )

    @property
    def final_forget_rate(self) -> float:
        """``tau``: ``forget_rate``, or with ``"estimate"`` the current estimate (0 before it
        exists, at most ``MAX_ESTIMATED_RATE``)."""
        if self.estimate is None:
            return float(self.forget_rate)
        return estimated_forget_rate(self.estimate.value)

    def forget_rate_at(self, epoch: int) -> float:
        """The fraction of each mini-batch dropped at 0-based ``epoch`` (with
        ``forget_rate="estimate"``: the schedule towards the current estimate)."""
        return coteaching_forget_rate(
            epoch,
            forget_rate=self.final_forget_rate,
            num_gradual=self.num_gradual,
            exponent=self.exponent,
            schedule_offset=self.schedule_offset,
        )

    def select(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor:
        """1 for the ``int((1 - R) * B)`` smallest losses of ``batch`` (at least 1), else 0."""
        rate = self.forget_rate_at(trainer.current_epoch)
        pl_module.log(
            "small_loss/forget_rate", rate, on_step=False, on_epoch=True, batch_size=len(batch)
        )
        keep = small_loss_mask(batch.loss, num_kept(len(batch), rate))
        return keep.float()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.estimate is not None:
            if find_callback(trainer, TrainingDynamics) is None:
                raise RuntimeError(
                    needs_dynamics_message("SmallLossSelection(forget_rate='estimate')")
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.estimate is None:
            return
        value = self.estimate.refresh(trainer, who="SmallLossSelection(forget_rate='estimate')")
        if value is not None:
            pl_module.log(NOISE_RATE_KEY, value, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.estimate is None else {"estimate": self.estimate.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self.estimate is not None and "estimate" in state_dict:
            self.estimate.load_state_dict(state_dict["estimate"])


class AdaptiveK(SamplePolicyCallback):
    """Keep the samples whose loss is below an adaptive threshold (Adaptive-k, Dedeoglu 2022).

    Dedeoglu, Kesgin, Amasyali, "A Robust Optimization Method for Label Noisy Datasets Based
    on Adaptive Threshold: Adaptive-k", arXiv:2203.14165 (Frontiers of Computer Science 2024).
    The rule reproduces the official notebook (``enesdedeoglu-TR/Adaptive-k``, ``MNIST.ipynb``):

    * for the first ``warmup_epochs`` epochs every sample is kept and nothing is tracked (the
      notebook's 30 "vanilla" epochs);
    * afterwards, at every training batch, with ``mu`` the batch mean of the per-sample loss,
      first ``m <- beta1 m + (1 - beta1) mu`` and ``v <- beta2 v + (1 - beta2) mu^2``
      (``m = v = 0`` at the end of warm-up, carried across epochs, **no** bias correction),
      then ``threshold = m / (sqrt(v) + eps)``, and a sample is kept when
      ``loss <= threshold``. The current batch therefore enters its own threshold.

    Note what this threshold is: without bias correction, for a constant ``mu`` it equals
    ``(1 - beta1^t) / sqrt(1 - beta2^t)`` (3.16 at ``t = 1``, about 6.5 at ``t = 10``, 3.2 at
    ``t = 100``, 1.26 at ``t = 1000``, tending to 1), and when the loss drifts it tends to
    ``E[mu] / sqrt(E[mu^2]) <= 1``. It is a ratio without the loss's units that is compared
    with raw loss values (in nats for cross-entropy): it does not scale with the loss. We
    could not check the paper's equation against the code (the paper text was not available);
    this class does what the code does.

    Deviations from the notebook, all deliberate:

    * The notebook runs a second forward pass on the kept samples; here the kept samples'
      losses of the single forward pass are averaged by
      :class:`~lightning_noise.mixins.PerSampleLossMixin`. The gradient is identical for
      models without batch-dependent layers; with BatchNorm the statistics (and dropout masks)
      of the one pass over the whole batch are used.
    * When no sample passes, the notebook back-propagates the previous batch's loss again (a
      bug); here the loss is zero (the optimizer still steps: weight decay and momentum act).
    * ``mu`` is summed in float64 (the notebook averages in float32).

    Under DDP ``mu`` is the mean over the **global** batch (a sum and a count all-reduced with
    ``trainer.strategy.reduce``), so ``m``, ``v`` and the threshold are identical on every rank
    and equal those of one device seeing the global batch; each rank then keeps its own
    samples below that threshold. One call of ``reduce_loss`` per training batch is assumed
    (each call updates ``m`` and ``v``). The state ``(m, v, steps)`` is checkpointed, so a
    resumed run continues exactly. The threshold is logged as ``adaptive_k/threshold``.

    Outside the training loop (validation, test) every sample is kept and nothing is updated.

    Args:
        warmup_epochs: epochs of plain training before selection starts, >= 0 (the notebook:
            30 of 80).
        beta1: decay of the moving average of the batch mean loss, in ``[0, 1)``.
        beta2: decay of the moving average of its square, in ``[0, 1)``.
        eps: added to ``sqrt(v)``, > 0.

    Raises:
        ValueError: for bad hyperparameters (in ``__init__``).
        RuntimeError: at ``setup`` when the module has no ``reduce_loss``
            (:class:`~lightning_noise.mixins.PerSampleLossMixin`), at the end of a training
            epoch in which the module never called it, and when a batch's mean loss is not
            finite (it would poison ``m`` and ``v`` for the rest of training; raised at the
            next logging interval or epoch end, see :meth:`select`).

    Example:
        >>> adaptive = AdaptiveK(warmup_epochs=10)
        >>> adaptive.state_dict()["m"], adaptive.state_dict()["steps"]
        (0.0, 0)
        >>> trainer = pl.Trainer(callbacks=[adaptive], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        warmup_epochs: int = 30,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.warmup_epochs = check_int(
            "warmup_epochs", warmup_epochs, minimum=0, hint="(the official code uses 30)"
        )
        #: The moving averages ``m``, ``v`` and the number of updates (training batches after
        #: warm-up), :class:`~lightning_noise.functional.selection.AdaptiveKState`.
        self.state = AdaptiveKState(beta1, beta2, eps)
        self.beta1, self.beta2, self.eps = self.state.beta1, self.state.beta2, self.state.eps
        #: First global step with a non-finite batch mean (-1: none), kept on the device.
        self._bad_step: Tensor | None = None

    @property
    def m(self) -> float:
        """Moving average of the batch mean loss (float64)."""
        return float(self.state.m)

    @property
    def v(self) -> float:
        """Moving average of the squared batch mean loss (float64)."""
        return float(self.state.v)

    @property
    def steps(self) -> int:
        """Number of moving-average updates (training batches after warm-up)."""
        return int(self.state.steps)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            warmup_epochs=self.warmup_epochs, beta1=self.beta1, beta2=self.beta2, eps=self.eps
        )

    @property
    def threshold(self) -> float:
        """The current threshold ``m / (sqrt(v) + eps)`` (0 before the first update)."""
        return float(self.state.threshold)

    def update(self, batch_mean: float) -> float:
        """Fold one batch mean loss into ``m`` and ``v``; return the new threshold."""
        return float(self.state.update(batch_mean))

    def select(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor:
        """Warm-up: all ones. Then update ``m``, ``v``; 1 where ``loss <= threshold``.

        Everything stays on the loss's device: the step reads nothing on the host. A
        non-finite batch mean leaves ``m`` and ``v`` unchanged and is recorded on the device;
        :meth:`check_finite` raises for it at the next logging interval
        (``trainer.log_every_n_steps``) or at the end of the epoch, whichever comes first.
        """
        ones = torch.ones(len(batch), dtype=torch.float32, device=batch.loss.device)
        if trainer.current_epoch < self.warmup_epochs:
            return ones
        loss = batch.loss
        # float64 where the device has it (MPS has not).
        dtype = torch.float32 if loss.device.type == "mps" else torch.float64
        count = torch.full((), float(len(batch)), dtype=dtype, device=loss.device)
        total = torch.stack([loss.to(dtype).sum(), count])
        # Global sum and count: every rank folds the same global batch mean into m and v.
        total = trainer.strategy.reduce(total, reduce_op="sum")
        loss_sum, global_count = total[0], total[1]
        batch_mean = loss_sum / global_count.clamp(min=1)
        finite = torch.isfinite(batch_mean)
        self._note_non_finite(finite, trainer.global_step)
        threshold = self.state.update(batch_mean, valid=finite & (global_count > 0))
        pl_module.log("adaptive_k/threshold", threshold.float(), on_step=True, on_epoch=False)
        if trainer.log_every_n_steps > 0 and trainer.global_step % trainer.log_every_n_steps == 0:
            self.check_finite()
        return (loss.to(dtype) <= threshold).to(ones.dtype)

    def _note_non_finite(self, finite: Tensor, step: int) -> None:
        """Keep the first global step whose batch mean was not finite (-1: none), on device."""
        if self._bad_step is None or self._bad_step.device != finite.device:
            self._bad_step = torch.full((), -1, dtype=torch.int64, device=finite.device)
        first = ~finite & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)

    def check_finite(self) -> None:
        """Raise if a batch mean loss was not finite since the last check (one host read)."""
        if self._bad_step is None:
            return
        step = int(self._bad_step)
        if step >= 0:
            raise RuntimeError(
                f"AdaptiveK got a non-finite mean loss at global step {step}; it would make "
                "the threshold NaN for the rest of training. Lower the learning rate or "
                "enable gradient clipping."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_finite()
        super().on_train_epoch_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.state.state_dict(),
            "warmup_epochs": self.warmup_epochs,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.state.load_state_dict(state_dict)
