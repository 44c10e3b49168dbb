"""ImageClassifier: a LightningModule on any timm backbone, with per-sample losses."""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_noise._compat import assert_on_device
from lightning_noise.mixins.noisefit import NoiseFiTMixin
from lightning_noise.mixins.per_sample import PerSampleLossMixin
from lightning_noise.models.sharding import shard_networks
from lightning_noise.types import SampleBatch

__all__ = ["ImageClassifier", "create_backbone", "load_backbone_weights"]

OptimizerCallable = Callable[[Iterable[Any]], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def create_backbone(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained_file: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model, randomly initialised or from a local weights file, with a clear
    error for unknown names.

    Pretrained weights are never downloaded (``pretrained=False``): this library runs
    offline. ``pretrained_file`` loads every weight but the classifier head from a local file
    (see :func:`load_backbone_weights`); the head is timm's fresh initialisation for
    ``num_classes``. Extra ``kwargs`` go to ``timm.create_model`` (``drop_rate``,
    ``img_size``, ...), except ``cifar_stem=True``: a timm ResNet adapted to 32x32 inputs as
    the noisy-label papers' CIFAR ResNets are (He et al.'s CIFAR variant): a 3x3 stride-1
    first convolution and no max-pooling, so the first stage sees 32x32 maps instead of 8x8.

    Example:
        >>> net = create_backbone("resnet18", num_classes=10, in_chans=1)
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
        >>> create_backbone("resnet18", num_classes=10, cifar_stem=True).conv1
        Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(
            f"timm does not know a backbone named {name!r}{hint} "
            "(list them with `timm.list_models('*resnet*')`)"
        )
    if kwargs.pop("pretrained", False) or "pretrained_cfg_overlay" in kwargs:
        raise ValueError(
            "pretrained weights cannot be downloaded here; give a local weights file instead "
            "(ImageClassifier(pretrained_file=...), in a recipe model.init_args.pretrained_file; "
            "create_backbone(..., pretrained_file=...)), or train from scratch"
        )
    cifar_stem = bool(kwargs.pop("cifar_stem", False))
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    if cifar_stem:
        conv1 = getattr(model, "conv1", None)
        if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise ValueError(
                f"cifar_stem applies to timm ResNets with a single conv1 and a maxpool "
                f"(resnet18, resnet34, resnet50, ...); {name!r} has none"
            )
        model.conv1 = nn.Conv2d(in_chans, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if pretrained_file is not None:
        load_backbone_weights(model, pretrained_file)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file: safetensors, or a ``torch.save`` file read with
    ``weights_only=True`` (a bare state dict, or a checkpoint holding one under
    ``"state_dict"``, ``"model"`` or ``"state_dict_ema"``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles of arbitrary objects, truncated files, not torch
        raise ValueError(
            f"cannot read weights from {path}: {error}. Give a state dict saved with "
            "torch.save(model.state_dict(), path) or a .safetensors file (the "
            "file is read with weights_only=True: no pickled objects)"
        ) from error
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"{path} holds no state dict of tensors (got {type(loaded).__name__}); save the "
            "backbone with torch.save(model.state_dict(), path)"
        )
    return loaded


def _strip_prefix(state: dict[str, Tensor], keys: set[str]) -> dict[str, Tensor]:
    """``state`` with the prefix of a wrapper removed when the model's keys need it: an
    ImageClassifier checkpoint's ``backbone.``, DDP's ``module.``."""
    for prefix in ("backbone.", "module.", "model."):
        if not (state.keys() & keys) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _head_names(model: nn.Module) -> list[str]:
    """The module names of the classifier head(s): timm's ``pretrained_cfg["classifier"]``
    (a name or a tuple, e.g. a distilled ViT's two heads), or ``get_classifier()``."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = [names] if isinstance(names, str) else list(names or [])
    if not names and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is head and n]
    return names


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a timm ``model``, all but its classifier head.

    The file is a state dict of the same architecture (``torch.save(model.state_dict())``,
    a ``.safetensors`` file such as timm's own pretrained files, or a checkpoint holding one,
    e.g. an ImageClassifier checkpoint, whose ``backbone.`` prefix is removed). As timm's own
    pretrained loader does, the model's ``checkpoint_filter_fn`` (if its timm module has one:
    e.g. ViTs resample position embeddings to another ``img_size``) is applied and the first
    convolution is adapted when the file has another number of input channels
    (``timm.models.adapt_input_conv``: RGB weights summed for one channel). The head named by
    timm's ``pretrained_cfg["classifier"]`` is never loaded: it keeps the model's own
    initialisation for its ``num_classes``. Unlike timm (which loads non-strictly when the
    class count differs), every other weight must be in the file with its shape, and the file
    must hold nothing else: any mismatch is a ``ValueError`` naming the keys.

    Example:
        >>> import tempfile
        >>> source = create_backbone("resnet10t", num_classes=4)
        >>> path = tempfile.mkdtemp() + "/resnet10t.pt"
        >>> torch.save(source.state_dict(), path)
        >>> model = create_backbone("resnet10t", num_classes=10, pretrained_file=path)
        >>> torch.equal(model.conv1[0].weight, source.conv1[0].weight), model.fc.out_features
        (True, 10)
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained_file {str(path)!r} does not exist; give the path of a local weights "
            "file (a state dict saved with torch.save(model.state_dict(), path) or a "
            ".safetensors file); nothing is downloaded"
        )
    own = model.state_dict()
    state = _strip_prefix(_read_state_dict(path), set(own))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):  # as timm's load_pretrained calls it
        takes_model = len(inspect.signature(filter_fn).parameters) > 1
        state = filter_fn(state, model) if takes_model else filter_fn(state)
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    for name in [first] if isinstance(first, str) else list(first or []):
        key = f"{name}.weight"
        if key in state and key in own and state[key].dim() == 4:
            if state[key].shape[1] != own[key].shape[1]:
                from timm.models import adapt_input_conv

                state[key] = adapt_input_conv(own[key].shape[1], state[key])
    heads = tuple(f"{name}." for name in _head_names(model))
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    wanted = {k for k in own if not k.startswith(heads)}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in wanted & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights missing from the file ({missing[:4]}...)")
        if unexpected:
            problems.append(f"{len(unexpected)} not in the model ({unexpected[:4]}...)")
        for k in wrong[:4]:
            problems.append(f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        raise ValueError(
            f"{path} does not match the backbone {type(model).__name__}: "
            + "; ".join(problems)
            + ". Use the backbone name and backbone_kwargs the file was saved from (same "
            "architecture and width; only the head and the input channels may differ)"
        )
    model.load_state_dict(state, strict=False)


class ImageClassifier(PerSampleLossMixin, NoiseFiTMixin, pl.LightningModule):
    """Image classification on a timm backbone, ready for noisy-label methods.

    The criterion runs with ``reduction="none"``; the per-sample losses are reduced through
    :class:`~lightning_noise.mixins.PerSampleLossMixin` (so sample-selection callbacks plug
    in) and ``training_step`` returns ``{"loss", "per_sample_loss", "logits", "target",
    "index"}`` for observing callbacks such as
    :class:`~lightning_noise.dynamics.TrainingDynamics`.

    Training batches are ``(input, target, index)``; validation and test batches
    ``(input, target)`` (a trailing index is ignored). Logged metrics: ``train/loss``,
    ``train/acc`` (against the given labels), ``val/acc``, ``val/ece``, ``val/loss``,
    ``test/acc``, ``test/ece``, ``test/loss``; when the training set has a ``noise_mask``
    (synthetic or human label noise), the memorisation curve: ``train/acc_clean_labels``
    and ``train/acc_noisy_labels`` (accuracy against the given label on clean-labelled
    and on noisy-labelled samples) and ``train/recovered_noisy`` (how often a noisy-labelled
    sample is predicted as its true class). Clean labels are read only for these metrics.

    Args:
        backbone: a timm model name, e.g. ``"resnet18"``.
        num_classes: number of classes (LightningCLI links it from the DataModule).
        in_chans: input channels (linked from the DataModule).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        pretrained_file: a local weights file of the same backbone to fine-tune from (see
            :func:`load_backbone_weights`): every weight is loaded but the classifier head,
            which is freshly initialised for ``num_classes``. ``None``: train from scratch.
            The file is read when the module is built, also when it is rebuilt from one of its
            own checkpoints (whose weights then replace the file's); pass
            ``pretrained_file=None`` to ``load_from_checkpoint`` if the file is gone.
        criterion: a loss module called as ``criterion(logits, target)`` (any loss of
            :mod:`lightning_noise.losses`); its ``reduction`` is set to ``"none"``. It must
            return one loss per sample. A criterion with ``needs_index = True`` also gets
            ``index=`` (the samples' training-set positions, ``None`` outside training); one
            with ``set_progress(epoch, max_epochs)`` is told the epoch at the start of every
            training epoch. Default cross-entropy.
        optimizer: a callable from parameters to an optimizer. Default ``AdamW(lr=1e-3)``.
        scheduler: an optional callable from the optimizer to an LR scheduler, stepped
            every epoch (``ReduceLROnPlateau`` monitors ``val/loss``).
        ece_bins: number of bins of the expected calibration error.

    Example:
        >>> model = ImageClassifier("resnet18", num_classes=10, in_chans=1)
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
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
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if ece_bins < 1:
            raise ValueError(f"ece_bins must be >= 1, got {ece_bins}")
        self.save_hyperparameters(ignore=["criterion", "optimizer", "scheduler"])
        self.backbone = create_backbone(
            backbone,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained_file=pretrained_file,
            **(backbone_kwargs or {}),
        )
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        if hasattr(self.criterion, "reduction"):
            self.criterion.reduction = "none"
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = num_classes

        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, average="micro")

        def ece() -> MulticlassCalibrationError:
            return MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins)

        self.train_acc, self.val_acc, self.test_acc = acc(), acc(), acc()
        self.val_ece, self.test_ece = ece(), ece()
        self.train_acc_clean = MeanMetric()
        self.train_acc_noisy = MeanMetric()
        self.train_recovered = MeanMetric()
        # Filled in on_train_start from the training set (not checkpointed: it is data).
        self.register_buffer("noise_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.register_buffer("clean_targets", torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2), ``fully_shard`` the backbone:
        each of its blocks, then the backbone itself, on the data-parallel mesh
        (:func:`~lightning_noise.models.sharding.shard_networks`, which says how the blocks are
        found). Under any other strategy nothing happens. Tensor parallelism
        (``tensor_parallel_size > 1``) is refused."""
        shard_networks(self, [self.backbone])

    def per_sample_loss(
        self, logits: Tensor, target: Tensor, index: Tensor | None = None
    ) -> Tensor:
        """The criterion's ``[B]`` per-sample losses (checked to be per-sample).

        A criterion with ``needs_index = True`` (e.g. :class:`~lightning_noise.losses.ELRLoss`)
        also gets the samples' ``index`` (``None`` outside training).
        """
        if getattr(self.criterion, "needs_index", False):
            losses = self.criterion(logits, target, index=index)
        else:
            losses = self.criterion(logits, target)
        if losses.dim() != 1 or losses.shape[0] != logits.shape[0]:
            raise ValueError(
                f"criterion {type(self.criterion).__name__} returned shape "
                f"{tuple(losses.shape)}; it must return one loss per sample "
                "(give it a `reduction` argument that accepts 'none')"
            )
        return losses

    # ----------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        mask = getattr(dataset, "noise_mask", None)
        clean = getattr(dataset, "clean_targets", None)
        if mask is None and self.trainer.datamodule is not None:
            mask = getattr(self.trainer.datamodule, "noise_mask", None)
            clean = getattr(self.trainer.datamodule, "clean_targets", None)
        if mask is not None:
            self.noise_mask = torch.as_tensor(mask, dtype=torch.bool, device=self.device)
        if clean is not None:
            self.clean_targets = torch.as_tensor(clean, dtype=torch.long, device=self.device)

    @staticmethod
    def _unpack_train(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(batch, list | tuple) or len(batch) != 3:
            got = f"{len(batch)} items" if isinstance(batch, list | tuple) else type(batch)
            raise ValueError(
                f"training batches must be (input, target, index), got {got}; wrap the "
                "training set in lightning_noise.data.Indexed(dataset) to add sample indices"
            )
        return batch[0], batch[1], batch[2]

    def on_train_epoch_start(self) -> None:
        # Criteria with a schedule over training (MaxSupLoss's alpha ramp) follow the epoch.
        set_progress = getattr(self.criterion, "set_progress", None)
        if callable(set_progress):
            max_epochs = self.trainer.max_epochs
            set_progress(self.current_epoch, max_epochs if max_epochs and max_epochs > 0 else None)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, target, index = self._unpack_train(batch)
        logits = self(x)
        losses = self.per_sample_loss(logits, target, index)
        sample_batch = SampleBatch.create(index, target, logits, losses)
        loss = self.reduce_loss(losses, sample_batch)
        # With a NoiseFiT callback: the hybrid loss over two more, noisy, forward passes.
        loss = self.noisefit_loss(loss, logits, lambda: self(x))
        self.log_train_step(loss, sample_batch)
        return self.step_outputs(loss, sample_batch)

    def log_train_step(self, loss: Tensor, sample_batch: SampleBatch) -> None:
        """Log the training loss and accuracy and update the memorisation curve."""
        n = len(sample_batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.train_acc(sample_batch.logits, sample_batch.target)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        self._update_memorisation(sample_batch)

    def _update_memorisation(self, batch: SampleBatch) -> None:
        if self.noise_mask.numel() == 0:
            return
        # Checked on the device (no host sync per step; on the CPU it raises at once).
        assert_on_device(
            (batch.index < self.noise_mask.numel()).all(),
            f"a sample index is outside the training set's noise mask of "
            f"{self.noise_mask.numel()} samples; indices must be positions in the training set",
        )
        noisy = self.noise_mask[batch.index]
        correct = batch.correct.float()
        clean_w, noisy_w = (~noisy).float(), noisy.float()
        # MeanMetric with weights: the epoch value is sum(correct*w)/sum(w) over all ranks.
        self.train_acc_clean.update(correct, clean_w)
        self.train_acc_noisy.update(correct, noisy_w)
        if self.clean_targets.numel():
            recovered = (batch.logits.argmax(1) == self.clean_targets[batch.index]).float()
            self.train_recovered.update(recovered, noisy_w)

    def on_train_epoch_end(self) -> None:
        if self.noise_mask.numel() == 0:
            return
        for name, metric in (
            ("train/acc_clean_labels", self.train_acc_clean),
            ("train/acc_noisy_labels", self.train_acc_noisy),
            ("train/recovered_noisy", self.train_recovered),
        ):
            if metric.update_count:
                value = metric.compute()
                if torch.isfinite(value):  # nan when e.g. no noisy sample was seen
                    self.log(name, value)
            metric.reset()

    # --------------------------------------------------------------------- validation, test
    @staticmethod
    def _unpack_eval(batch: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, list | tuple) or len(batch) not in (2, 3):
            raise ValueError(
                "validation/test batches must be (input, target) or (input, target, index)"
            )
        return batch[0], batch[1]

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, target = self._unpack_eval(batch)
        logits = self(x)
        loss = self.per_sample_loss(logits, target).mean()
        if stage == "val":
            acc, ece = self.val_acc, self.val_ece
        else:
            acc, ece = self.test_acc, self.test_ece
        acc(logits, target)
        ece(logits.float().softmax(dim=1), target)
        n = target.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=True)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val", batch_size=n)
        self.log(f"{stage}/ece", ece, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(dim=1)

    # ---------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
