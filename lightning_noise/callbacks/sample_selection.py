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

The trainer-free core is :func:`coteaching_forget_rate`, :func:`num_kept`,
:func:`small_loss_mask`, :func:`adaptive_k_update` and :func:`adaptive_k_threshold`. The
callbacks are :class:`~lightning_noise.types.SamplePolicy` implementations: a LightningModule
that uses :class:`~lightning_noise.mixins.PerSampleLossMixin` asks them for 0/1 weights inside
``self.reduce_loss``, and the loss becomes the mean over the kept samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_noise.types import SampleBatch

__all__ = [
    "AdaptiveK",
    "SmallLossSelection",
    "adaptive_k_threshold",
    "adaptive_k_update",
    "coteaching_forget_rate",
    "num_kept",
    "small_loss_mask",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_schedule(forget_rate: Any, num_gradual: Any, exponent: Any) -> None:
    if not _is_real(forget_rate) or not 0.0 <= forget_rate < 1.0:
        raise ValueError(
            f"forget_rate must be a number in [0, 1) (Co-teaching sets it to the noise rate, "
            f"e.g. 0.2 or 0.45), got {forget_rate!r}"
        )
    if not _is_int(num_gradual) or num_gradual < 1:
        raise ValueError(
            f"num_gradual must be an integer >= 1 (Co-teaching uses 5, 10 or 15), "
            f"got {num_gradual!r}"
        )
    if not _is_real(exponent) or exponent <= 0:
        raise ValueError(
            f"exponent must be a finite number > 0 (Co-teaching uses 0.5, 1 or 2), got {exponent!r}"
        )


# --------------------------------------------------------------------------- functional core
def coteaching_forget_rate(
    epoch: int, *, forget_rate: float, num_gradual: int = 10, exponent: float = 1.0
) -> float:
    """Co-teaching's forget rate ``R(T)`` at 0-based ``epoch``, exactly as the official code.

    The official ``bhanML/Co-teaching`` ``main.py`` builds::

        rate_schedule = np.ones(n_epoch) * forget_rate
        rate_schedule[:num_gradual] = np.linspace(0, forget_rate ** exponent, num_gradual)

    and this function returns ``rate_schedule[epoch]`` (bit for bit, for any ``n_epoch``): a
    linear ramp from 0 at epoch 0 to ``forget_rate ** exponent`` at epoch ``num_gradual - 1``,
    then ``forget_rate`` from epoch ``num_gradual`` on.

    Two details of the official code are kept on purpose and differ from the paper's
    ``R(T) = min(T / T_k * tau, tau)`` (Algorithm 1 writes the *remember* rate ``1 - R``):

    * ``linspace`` includes its endpoint, so the ramp reaches its top at epoch
      ``num_gradual - 1`` (step ``tau / (T_k - 1)``), not at ``num_gradual``.
    * ``exponent`` (the paper's ``c``) raises ``forget_rate``, not the time: the ramp is linear
      up to ``tau ** c`` and then jumps to ``tau`` (up for ``c > 1``, down for ``c < 1``).

    Off by one: the official training loop runs ``for epoch in range(1, n_epoch)`` (its epoch
    0 only evaluates the random initialisation), so its first training epoch already forgets
    ``rate_schedule[1]``. Here ``epoch`` is Lightning's 0-based ``trainer.current_epoch``, so
    the first training epoch uses ``rate_schedule[0] = 0`` and keeps every sample, as in the
    paper's Algorithm 1 (which updates ``R(T)`` at the end of epoch ``T``); the whole schedule
    is one epoch later than the official run's.

    Args:
        epoch: 0-based epoch, >= 0.
        forget_rate: ``tau``, the final fraction of each mini-batch to drop, in ``[0, 1)``.
        num_gradual: ``T_k``, the number of ramp epochs, >= 1.
        exponent: ``c``, > 0.

    Returns:
        The fraction of each mini-batch to drop at ``epoch``.

    Example:
        >>> [round(coteaching_forget_rate(e, forget_rate=0.4, num_gradual=5), 2) for e in range(6)]
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4]
    """
    _check_schedule(forget_rate, num_gradual, exponent)
    if not _is_int(epoch) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    if epoch >= num_gradual:
        return float(forget_rate)
    if num_gradual == 1:  # np.linspace(0, x, 1) == [0.0]
        return 0.0
    stop = float(forget_rate) ** float(exponent)
    if epoch == num_gradual - 1:  # np.linspace writes the endpoint exactly
        return stop
    # np.linspace computes arange(num) * (stop - start) / (num - 1) + start in float64.
    return float(epoch) * (stop / (num_gradual - 1)) + 0.0


def num_kept(batch_size: int, forget_rate: float) -> int:
    """How many samples of a mini-batch of ``batch_size`` survive ``forget_rate``.

    ``int((1 - forget_rate) * batch_size)`` as in the official Co-teaching ``loss.py``
    (truncation, not rounding), but at least 1 for a non-empty batch: the official code would
    divide by zero there (a loss of NaN), which happens only for tiny per-device batches
    (e.g. ``batch_size=1`` with any positive forget rate).

    Example:
        >>> num_kept(128, 0.2), num_kept(10, 0.45), num_kept(1, 0.5), num_kept(0, 0.5)
        (102, 5, 1, 0)
    """
    if not _is_int(batch_size) or batch_size < 0:
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    if not _is_real(forget_rate) or not 0.0 <= forget_rate < 1.0:
        raise ValueError(f"forget_rate must be a number in [0, 1), got {forget_rate!r}")
    if batch_size == 0:
        return 0
    return max(1, int((1.0 - forget_rate) * batch_size))


def small_loss_mask(loss: Tensor, k: int) -> Tensor:
    """``[B]`` bool mask of the ``k`` smallest entries of the ``[B]`` per-sample ``loss``.

    Ties are broken by position (a stable ascending sort: the earlier sample wins), so the
    mask is deterministic on every device. NaN losses sort last, so they are dropped first.
    (The official Co-teaching code uses ``np.argsort``, whose default quicksort does not fix
    the order of ties.)

    Example:
        >>> small_loss_mask(torch.tensor([0.3, 0.1, 0.3, 0.2]), 3).tolist()
        [True, True, False, True]
    """
    if loss.dim() != 1:
        raise ValueError(f"loss must be 1-D (one loss per sample), got {tuple(loss.shape)}")
    if not _is_int(k) or not 0 <= k <= loss.shape[0]:
        raise ValueError(f"k must be an integer in [0, {loss.shape[0]}], got {k!r}")
    order = torch.sort(loss.detach(), stable=True).indices
    mask = torch.zeros(loss.shape[0], dtype=torch.bool, device=loss.device)
    mask[order[:k]] = True
    return mask


def adaptive_k_update(
    m: float, v: float, batch_mean: float, *, beta1: float = 0.9, beta2: float = 0.999
) -> tuple[float, float]:
    """One Adaptive-k moving-average step: ``m <- b1 m + (1-b1) mu``, ``v <- b2 v + (1-b2) mu^2``.

    ``mu`` is the mini-batch mean loss. As in the official notebook there is **no** bias
    correction. Computed in float64 (Python floats), as the notebook's NumPy code.

    Example:
        >>> m, v = adaptive_k_update(0.0, 0.0, 2.0)
        >>> round(m, 6), round(v, 6)
        (0.2, 0.004)
    """
    m = beta1 * m + (1.0 - beta1) * batch_mean
    v = beta2 * v + (1.0 - beta2) * batch_mean * batch_mean
    return m, v


def adaptive_k_threshold(m: float, v: float, eps: float = 1e-8) -> float:
    """The Adaptive-k threshold ``m / (sqrt(v) + eps)`` (official notebook, no bias correction).

    Example:
        >>> round(adaptive_k_threshold(*adaptive_k_update(0.0, 0.0, 2.0)), 4)  # 0.1 / sqrt(0.001)
        3.1623
    """
    return m / (math.sqrt(v) + eps)


# ------------------------------------------------------------------------------- callbacks
class _SmallLossPolicy(Callback):
    """Shared plumbing: the mixin check at setup and the "was I ever asked" check."""

    def __init__(self) -> None:
        self._asked_this_epoch = 0
        self._batches_this_epoch = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_noise.mixins.coteaching import CoTeachingMixin

        if stage == "fit" and isinstance(pl_module, CoTeachingMixin):
            raise ValueError(
                f"{type(self).__name__} cannot select samples for {type(pl_module).__name__}: "
                "Co-teaching already trains each network on the small-loss samples its peer "
                "picks; drop the callback (set the model's forget_rate instead), or use "
                "ImageClassifier for single-network selection"
            )
        if stage == "fit" and not callable(getattr(pl_module, "reduce_loss", None)):
            raise RuntimeError(
                f"{type(self).__name__} selects samples before the loss is reduced, but "
                f"{type(pl_module).__name__} has no `reduce_loss`: the module must use "
                "lightning_noise.mixins.PerSampleLossMixin and compute its training loss with "
                "`self.reduce_loss(per_sample_losses, batch)` (reduction='none')"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._asked_this_epoch = 0
        self._batches_this_epoch = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._batches_this_epoch += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A module with the mixin that reduces its loss some other way would train on every
        # sample while this callback appears to be active: fail instead of doing less.
        ran = self._batches_this_epoch
        if ran > 0 and self._asked_this_epoch == 0:
            raise RuntimeError(
                f"{type(self).__name__} was never asked for sample weights during a training "
                f"epoch of {ran} batches: {type(pl_module).__name__}.training_step must reduce "
                "its per-sample losses with `self.reduce_loss(losses, batch)` "
                "(lightning_noise.mixins.PerSampleLossMixin)"
            )

    def _asked(self, trainer: pl.Trainer) -> bool:
        """Count a training-time request; outside training (validation, test) keep all."""
        if not trainer.training:
            return False
        self._asked_this_epoch += 1
        return True


class SmallLossSelection(_SmallLossPolicy):
    """Train on the small-loss fraction of each mini-batch (Co-teaching, Han et al. 2018).

    Co-teaching's small-loss trick applied to one network ("Co-teaching: Robust Training of
    Deep Neural Networks with Extremely Noisy Labels", NeurIPS 2018; official code
    ``bhanML/Co-teaching``). At epoch ``T`` (``trainer.current_epoch``, 0-based) the
    ``num_kept(B, R(T)) = int((1 - R(T)) * B)`` samples of each mini-batch of ``B`` with the
    smallest loss get weight 1 and the others 0, so the training loss is their mean. The
    forget rate ``R(T)`` follows the official schedule (see :func:`coteaching_forget_rate`):
    0 at epoch 0, a linear ramp to ``forget_rate ** exponent`` at epoch ``num_gradual - 1``,
    ``forget_rate`` afterwards. At least one sample is always kept. Ties are broken by
    position in the batch. The current ``R(T)`` is logged as ``small_loss/forget_rate``; the
    mixin logs ``train/kept_fraction``.

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

    def __init__(self, forget_rate: float, num_gradual: int = 10, exponent: float = 1.0) -> None:
        super().__init__()
        _check_schedule(forget_rate, num_gradual, exponent)
        self.forget_rate = float(forget_rate)
        self.num_gradual = num_gradual
        self.exponent = float(exponent)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            forget_rate=self.forget_rate, num_gradual=self.num_gradual, exponent=self.exponent
        )

    def forget_rate_at(self, epoch: int) -> float:
        """The fraction of each mini-batch dropped at 0-based ``epoch``."""
        return coteaching_forget_rate(
            epoch,
            forget_rate=self.forget_rate,
            num_gradual=self.num_gradual,
            exponent=self.exponent,
        )

    def sample_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor:
        """1 for the ``int((1 - R) * B)`` smallest losses of ``batch`` (at least 1), else 0."""
        ones = torch.ones(len(batch), dtype=torch.float32, device=batch.loss.device)
        if not self._asked(trainer):
            return ones
        rate = self.forget_rate_at(trainer.current_epoch)
        pl_module.log(
            "small_loss/forget_rate", rate, on_step=False, on_epoch=True, batch_size=len(batch)
        )
        keep = small_loss_mask(batch.loss, num_kept(len(batch), rate))
        return keep.to(ones.dtype)

    def state_dict(self) -> dict[str, Any]:
        # Stateless: the selection is a function of the epoch and the batch. The
        # hyperparameters are saved for inspection; they are also part of state_key.
        return {
            "forget_rate": self.forget_rate,
            "num_gradual": self.num_gradual,
            "exponent": self.exponent,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass


class AdaptiveK(_SmallLossPolicy):
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
            finite (it would poison ``m`` and ``v`` for the rest of training).

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
        if not _is_int(warmup_epochs) or warmup_epochs < 0:
            raise ValueError(
                f"warmup_epochs must be an integer >= 0 (the official code uses 30), "
                f"got {warmup_epochs!r}"
            )
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not _is_real(beta) or not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}")
        if not _is_real(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.warmup_epochs = warmup_epochs
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        #: Moving average of the batch mean loss (float64).
        self.m = 0.0
        #: Moving average of the squared batch mean loss (float64).
        self.v = 0.0
        #: Number of moving-average updates (training batches after warm-up).
        self.steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            warmup_epochs=self.warmup_epochs, beta1=self.beta1, beta2=self.beta2, eps=self.eps
        )

    @property
    def threshold(self) -> float:
        """The current threshold ``m / (sqrt(v) + eps)`` (0 before the first update)."""
        return adaptive_k_threshold(self.m, self.v, self.eps)

    def update(self, batch_mean: float) -> float:
        """Fold one batch mean loss into ``m`` and ``v``; return the new threshold."""
        self.m, self.v = adaptive_k_update(
            self.m, self.v, batch_mean, beta1=self.beta1, beta2=self.beta2
        )
        self.steps += 1
        return self.threshold

    def sample_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: SampleBatch
    ) -> Tensor:
        """Warm-up: all ones. Then update ``m``, ``v``; 1 where ``loss <= threshold``."""
        ones = torch.ones(len(batch), dtype=torch.float32, device=batch.loss.device)
        if not self._asked(trainer) or trainer.current_epoch < self.warmup_epochs:
            return ones
        loss = batch.loss
        # float64 where the device has it (MPS has not).
        dtype = torch.float32 if loss.device.type == "mps" else torch.float64
        count = torch.tensor(float(len(batch)), dtype=dtype, device=loss.device)
        total = torch.stack([loss.to(dtype).sum(), count])
        # Global sum and count: every rank folds the same global batch mean into m and v.
        total = trainer.strategy.reduce(total, reduce_op="sum")
        loss_sum, global_count = (float(t) for t in total.cpu())
        if global_count == 0:
            return ones
        batch_mean = loss_sum / global_count
        if not math.isfinite(batch_mean):
            raise RuntimeError(
                f"AdaptiveK got a non-finite mean loss ({batch_mean}) at global step "
                f"{trainer.global_step}; it would make the threshold NaN for the rest of "
                "training. Lower the learning rate or enable gradient clipping."
            )
        threshold = self.update(batch_mean)
        pl_module.log("adaptive_k/threshold", threshold, on_step=True, on_epoch=False)
        return (loss.to(dtype) <= threshold).to(ones.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": self.m,
            "v": self.v,
            "steps": self.steps,
            "warmup_epochs": self.warmup_epochs,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.m = float(state_dict.get("m", 0.0))
        self.v = float(state_dict.get("v", 0.0))
        self.steps = int(state_dict.get("steps", 0))
