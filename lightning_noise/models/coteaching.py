"""CoTeachingClassifier: Co-teaching / Co-teaching+ with two timm backbones."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lightning_noise._validate import check_choice
from lightning_noise.functional.selection import check_schedule_offset
from lightning_noise.mixins.coteaching import CoTeachingMixin
from lightning_noise.models.classifier import (
    ImageClassifier,
    LRSchedulerCallable,
    OptimizerCallable,
    create_backbone,
)
from lightning_noise.models.sharding import shard_networks

__all__ = ["CoTeachingClassifier"]


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
            true noise rate).
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
        forget_rate: float | None = None,
        num_gradual: int = 10,
        exponent: float = 1.0,
        plus_start_epoch: int | None = None,
        predict_with: Literal["first", "ensemble"] = "first",
        schedule_offset: int = 0,
        plus_variant: Literal["paper", "official_code"] = "paper",
    ) -> None:
        super().__init__(
            backbone, num_classes, in_chans, backbone_kwargs, criterion, optimizer, scheduler,
            ece_bins,
        )  # fmt: skip
        if forget_rate is not None and (
            isinstance(forget_rate, bool) or not 0.0 <= forget_rate < 1.0
        ):
            raise ValueError(f"forget_rate must be None or in [0, 1), got {forget_rate!r}")
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
