"""CoTeachingClassifier: Co-teaching / Co-teaching+ with two timm backbones."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lightning_noise._validate import check_choice, check_int
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.dynamics.noise_rate import (
    ESTIMATE,
    NOISE_RATE_KEY,
    NoiseRateEstimate,
    default_estimate_until,
    estimated_forget_rate,
    needs_dynamics_message,
)
from lightning_noise.functional.selection import check_schedule_offset
from lightning_noise.mixins.coteaching import CoTeachingMixin
from lightning_noise.models.classifier import (
    ImageClassifier,
    LRSchedulerCallable,
    OptimizerCallable,
    create_backbone,
)
from lightning_noise.models.sharding import shard_networks
from lightning_noise.types import find_callback

__all__ = ["CoTeachingClassifier"]

_ESTIMATING = "CoTeachingClassifier(forget_rate='estimate')"
#: The checkpoint entry of the estimate (a module's own key, beside its state_dict).
_ESTIMATE_KEY = "coteaching_noise_rate_estimate"


class CoTeachingClassifier(CoTeachingMixin, ImageClassifier):
    """Two networks of the same timm architecture trained by Co-teaching (Han et al. 2018).

    Each network is updated on the small-loss samples picked by its peer, dropping a
    fraction R(T) of every batch that ramps linearly from 0 to ``forget_rate`` over the first
    ``num_gradual`` epochs. With ``plus_start_epoch`` set, Co-teaching+ (Yu et al. 2019) is used
    from that epoch: the exchange is restricted to samples the networks disagree on.

    Both networks are in the checkpoint and share the configured optimizer. Validation, test
    and prediction use the first network, or the average of both networks' probabilities with
    ``predict_with="ensemble"``. Metrics, the memorisation curve and the step outputs (for
    ``TrainingDynamics``) follow the first network; ``coteaching/label_precision`` is the
    fraction of clean labels among the samples the first network is updated on, when the
    training set knows its noise mask.

    Args:
        backbone, num_classes, in_chans, backbone_kwargs, criterion, optimizer, scheduler,
        ece_bins: as :class:`~lightning_noise.models.ImageClassifier`.
        forget_rate: tau, the final fraction dropped, in [0, 1); ``None`` takes the training
            set's realised noise rate at the start of training (the official default: the
            true noise rate, an oracle); ``"estimate"`` estimates it from the run itself
            (needs :class:`~lightning_noise.dynamics.TrainingDynamics` among the callbacks):
            at the start of each epoch a two-component Gaussian mixture is fitted to the
            first network's per-sample losses of the previous epoch, and tau is the fraction
            of samples in the high-loss component (DivideMix's mixture, Li et al. 2020;
            :class:`~lightning_noise.dynamics.noise_rate.NoiseRateEstimate`). Refitted on the
            losses of epochs 0 to ``estimate_until``, then frozen; logged as
            ``noise_rate/estimate``; checkpointed. Until the first estimate (epoch 0) tau is
            0, which the default schedule uses there anyway.
        num_gradual: T_k, the epochs of the linear ramp (official default 10).
        exponent: c in the ramp's ``tau ** c`` end point (official default 1).
        plus_start_epoch: epoch from which Co-teaching+ selects among disagreements
            (official: 0 MNIST, 20 CIFAR-10, 5 CIFAR-100, counted as ``schedule_offset=1``
            counts); ``None`` for plain Co-teaching.
        predict_with: ``"first"`` or ``"ensemble"``.
        schedule_offset: added to Lightning's 0-based epoch before the forget-rate schedule,
            ``plus_start_epoch`` and the official agreement gate read it: 0 (default) keeps
            every sample in the first epoch (the paper's Algorithm 1); 1 counts epochs as the
            official training loop (``range(1, n_epoch)``), whose first epoch already
            forgets ``tau / (T_k - 1)``.
        plus_variant: ``"paper"`` (default) or ``"official_code"``: the official
            Co-teaching+ loss (cross-entropy of softmax probabilities, its dataset-index-0
            quirk, agreeing batches trained on only while ``epoch * batch_idx < 5000``); see
            :class:`~lightning_noise.mixins.CoTeachingMixin`.
        estimate_until: with ``forget_rate="estimate"``, the last epoch (0-based) whose losses
            are fitted; ``None``: ``num_gradual - 2 - schedule_offset`` (at least 0), so the
            estimate is frozen where the ramp reaches its top.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        ece_bins: int = 15,
        *,
        forget_rate: float | Literal["estimate"] | None = None,
        num_gradual: int = 10,
        exponent: float = 1.0,
        plus_start_epoch: int | None = None,
        predict_with: Literal["first", "ensemble"] = "first",
        schedule_offset: int = 0,
        plus_variant: Literal["paper", "official_code"] = "paper",
        estimate_until: int | None = None,
    ) -> None:
        super().__init__(
            backbone, num_classes, in_chans, backbone_kwargs, criterion, optimizer, scheduler,
            ece_bins,
        )  # fmt: skip
        estimated = forget_rate == ESTIMATE
        if (
            forget_rate is not None
            and not estimated
            and (isinstance(forget_rate, bool | str) or not 0.0 <= forget_rate < 1.0)
        ):
            raise ValueError(
                f"forget_rate must be None (the training set's noise rate), 'estimate' (estimated "
                f"from the run's losses) or a number in [0, 1), got {forget_rate!r}"
            )
        if isinstance(num_gradual, bool) or not isinstance(num_gradual, int) or num_gradual < 1:
            raise ValueError(f"num_gradual must be an integer >= 1, got {num_gradual!r}")
        if isinstance(exponent, bool) or not exponent > 0:
            raise ValueError(f"exponent must be > 0, got {exponent!r}")
        if plus_start_epoch is not None and (
            isinstance(plus_start_epoch, bool)
            or not isinstance(plus_start_epoch, int)
            or plus_start_epoch < 0
        ):
            raise ValueError(f"plus_start_epoch must be None or >= 0, got {plus_start_epoch!r}")
        if predict_with not in ("first", "ensemble"):
            raise ValueError(f"predict_with must be 'first' or 'ensemble', got {predict_with!r}")
        self.schedule_offset = check_schedule_offset(schedule_offset)
        self.plus_variant = check_choice("plus_variant", plus_variant, ("paper", "official_code"))
        self.forget_rate = forget_rate  # type: ignore[assignment]  (resolved at train start)
        #: The noise-rate estimate behind ``forget_rate="estimate"`` (``None`` otherwise).
        self.noise_rate_estimate: NoiseRateEstimate | None = None
        if estimated:
            until = default_estimate_until(num_gradual, self.schedule_offset)
            if estimate_until is not None:
                until = check_int("estimate_until", estimate_until, minimum=0)
            self.noise_rate_estimate = NoiseRateEstimate(until=until)
        elif estimate_until is not None:
            raise ValueError(
                f"estimate_until={estimate_until!r} is for forget_rate='estimate'; with "
                f"forget_rate={forget_rate!r} leave it None"
            )
        self.num_gradual = num_gradual
        self.exponent = float(exponent)
        self.plus_start_epoch = plus_start_epoch
        self.predict_with = predict_with
        self.backbone2 = create_backbone(
            backbone, num_classes=num_classes, in_chans=in_chans, **(backbone_kwargs or {})
        )

    def coteaching_networks(self) -> tuple[nn.Module, nn.Module]:
        return self.backbone, self.backbone2

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2), ``fully_shard`` both networks, blocks
        first, each network its own root (:func:`~lightning_noise.models.sharding.
        shard_networks`); nothing under any other strategy."""
        shard_networks(self, self.coteaching_networks())

    def forward(self, x: Tensor) -> Tensor:
        if self.predict_with == "first":
            return self.backbone(x)
        probs = (self.backbone(x).softmax(dim=1) + self.backbone2(x).softmax(dim=1)) / 2
        return probs.clamp_min(1e-12).log()  # log-probabilities are valid logits

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.noise_rate_estimate is not None:
            if find_callback(self.trainer, TrainingDynamics) is None:
                raise RuntimeError(needs_dynamics_message(_ESTIMATING))
            self.forget_rate = estimated_forget_rate(self.noise_rate_estimate.value)
            return
        if self.hparams.forget_rate is not None:
            self.forget_rate = float(self.hparams.forget_rate)
            return
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        rate = getattr(dataset, "noise_rate", None)
        if rate is None:
            raise ValueError(
                "CoTeachingClassifier(forget_rate=None) takes the training set's noise rate, "
                "but the training dataset has no `noise_rate`; pass forget_rate= (your "
                "estimate of the noise rate)"
            )
        self.forget_rate = min(float(rate), 0.99)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.noise_rate_estimate is None:
            return
        value = self.noise_rate_estimate.refresh(self.trainer, who=_ESTIMATING)
        self.forget_rate = estimated_forget_rate(value)
        if value is not None:
            self.log(NOISE_RATE_KEY, value, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.noise_rate_estimate is not None:
            checkpoint[_ESTIMATE_KEY] = self.noise_rate_estimate.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.noise_rate_estimate is not None and _ESTIMATE_KEY in checkpoint:
            self.noise_rate_estimate.load_state_dict(checkpoint[_ESTIMATE_KEY])

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, target, index = self._unpack_train(batch)
        loss, sample_batch, stats = self.coteaching_step(x, target, index, batch_idx=batch_idx)
        self.log_train_step(loss, sample_batch)
        n = len(sample_batch)
        self.log("coteaching/forget_rate", stats["forget_rate"], on_epoch=True, batch_size=n)
        self.log("coteaching/kept_fraction", stats["kept_fraction"], on_epoch=True, batch_size=n)
        if self.noise_mask.numel():
            keep = stats["keep_for_net1"]
            clean = ((~self.noise_mask[sample_batch.index]) & keep).sum() / keep.sum()
            self.log("coteaching/label_precision", clean, on_epoch=True, batch_size=n)
        return self.step_outputs(loss, sample_batch)
