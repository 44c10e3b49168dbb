"""Shared base of the noisy-label DataModules: splits, label noise and deterministic loaders.

A subclass says how to read its data (:meth:`NoisyLabelDataModule._build_splits`); the base
wraps the training split in :class:`~lightning_noise.data.noise.NoisyLabels` so that training
batches are ``(input, noisy_target, index)`` (DESIGN.md protocol 1), optionally corrupts the
validation split too, and builds the data loaders.

Everything is derived from seeds (``seed`` for the split and the per-epoch order,
``noise.seed`` for the noisy labels), so a DataModule re-created from the same config has the
same splits, labels and batch order; nothing needs to be checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from lightning_noise._validate import check_int, check_number
from lightning_noise.data.noise import NOISE_TYPES, LabelNoise, NoisyLabels, _as_label_noise
from lightning_noise.data.threshold import ThresholdSamples

__all__ = ["NoisyLabelDataModule", "stratified_split"]

# Offset added to ``noise.seed`` for the validation split's noise (``noisy_validation=True``),
# so that its flips are drawn independently of the training split's.
_VAL_NOISE_SEED_OFFSET = 1_000_003


# --------------------------------------------------------------------------------------------
# Small helpers shared by the subclasses
# --------------------------------------------------------------------------------------------
def _check_fraction(name: str, value: Any, *, optional: bool = False) -> float | None:
    """A split fraction in ``[0, 1)`` (or ``None`` when ``optional``), else ``ValueError``."""
    if optional and value is None:
        return None
    return check_number(name, value, low=0, high=1, high_open=True)


def _split_size(fraction: float, n: int) -> int:
    """Number of samples for ``fraction`` of ``n``: rounded, and at least 1 if fraction > 0."""
    if fraction <= 0.0:
        return 0
    return max(1, round(fraction * n))


def _largest_remainder(total: int, quotas: Tensor, caps: Tensor, gen: torch.Generator) -> Tensor:
    """Integer allocation of ``total`` proportional to ``quotas`` (float) with ``alloc <= caps``."""
    alloc = torch.minimum(quotas.floor().long(), caps)
    remainder = (quotas - alloc).tolist()
    tiebreak = torch.rand(quotas.shape[0], generator=gen).tolist()
    order = sorted(range(quotas.shape[0]), key=lambda c: (-remainder[c], tiebreak[c]))
    short = total - int(alloc.sum())
    while short > 0:
        progressed = False
        for c in order:
            if short == 0:
                break
            if alloc[c] < caps[c]:
                alloc[c] += 1
                short -= 1
                progressed = True
        if not progressed:  # pragma: no cover - callers never ask for more than fits
            raise ValueError(f"cannot allocate {total} samples within the class counts")
    return alloc


def stratified_split(
    targets: Tensor | Sequence[int], n_val: int, n_test: int, *, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Split sample positions into train/val/test with the class proportions of ``targets``.

    Each class contributes to the validation and test splits in proportion to its size
    (largest-remainder rounding, so the split sizes are exactly ``n_val`` and ``n_test`` and each
    class count is within one sample of its exact share). Deterministic given ``seed``; the
    global RNG is not touched.

    Args:
        targets: 1-D class indices of the pool.
        n_val: validation split size.
        n_test: test split size.
        seed: seed of the local generator.

    Returns:
        ``(train, val, test)``: sorted int64 position tensors that partition ``range(N)``.

    Example:
        >>> tr, va, te = stratified_split(torch.arange(4).repeat(25), 20, 10, seed=0)
        >>> len(tr), len(va), len(te), torch.bincount(torch.arange(4).repeat(25)[va]).tolist()
        (70, 20, 10, [5, 5, 5, 5])
    """
    y = torch.as_tensor(targets).reshape(-1).long()
    n = y.shape[0]
    if n_val < 0 or n_test < 0 or n_val + n_test >= n:
        raise ValueError(
            f"cannot split {n} samples into {n_val} validation and {n_test} test samples: at "
            "least one training sample must remain; lower the split fractions"
        )
    gen = torch.Generator().manual_seed(seed)
    num_classes = int(y.max()) + 1 if n else 0
    counts = torch.bincount(y, minlength=num_classes)
    share = counts.double() / max(n, 1)
    val_counts = _largest_remainder(n_val, share * n_val, counts, gen)
    test_counts = _largest_remainder(n_test, share * n_test, counts - val_counts, gen)
    train, val, test = [], [], []
    for c in range(num_classes):
        members = (y == c).nonzero().squeeze(1)
        members = members[torch.randperm(members.shape[0], generator=gen)]
        v, t = int(val_counts[c]), int(test_counts[c])
        val.append(members[:v])
        test.append(members[v : v + t])
        train.append(members[v + t :])

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long)

    return cat(train), cat(val), cat(test)


def random_crop_with_padding(image: Tensor, padding: int, fill: float = 0.0) -> Tensor:
    """Pad ``image`` ``[C, H, W]`` by ``padding`` on every side, then crop ``H x W`` at random.

    The offset is drawn from torch's global RNG (seeded per worker by the DataLoader).
    """
    if padding <= 0:
        return image
    c, h, w = image.shape
    padded = image.new_full((c, h + 2 * padding, w + 2 * padding), fill)
    padded[:, padding : padding + h, padding : padding + w] = image
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    return padded[:, top : top + h, left : left + w]


def random_horizontal_flip(image: Tensor, p: float = 0.5) -> Tensor:
    """Flip ``image`` ``[C, H, W]`` left-right with probability ``p`` (torch's global RNG)."""
    if float(torch.rand(())) < p:
        return image.flip(-1)
    return image


class TensorImageDataset(Dataset):
    """In-memory ``(image, target)`` dataset over an ``[N, C, H, W]`` tensor.

    Args:
        images: ``[N, C, H, W]`` tensor (any dtype; ``transform`` makes it float).
        targets: ``[N]`` class indices (exposed as ``.targets``).
        transform: optional callable applied to one ``[C, H, W]`` image.
    """

    def __init__(
        self, images: Tensor, targets: Tensor, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if images.shape[0] != targets.shape[0]:
            raise ValueError(
                f"images and targets must have the same length, got {images.shape[0]} and "
                f"{targets.shape[0]}"
            )
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class ResumableSampler(StatefulDistributedSampler):
    """The training order of a DataModule: a function of (seed, epoch), resumable mid-epoch.

    torchdata's ``StatefulDistributedSampler`` remembers how many samples of the epoch it has
    yielded; this one also remembers the epoch, so that a loader restored from a checkpoint
    taken in the middle of an epoch skips into *that* epoch's order (a fresh sampler would
    start from epoch 0's order until Lightning sets the epoch, after the skip).
    """

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.set_epoch(int(state_dict.get("epoch", self.epoch)))


class TransformedSubset(Dataset):
    """``(transform(input), target)`` for the given positions of a ``(input, target)`` dataset.

    Unlike ``torch.utils.data.Subset`` it applies its own ``transform``, so one underlying
    dataset (e.g. one ``ImageFolder`` scan) serves splits with different transforms.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Tensor,
        targets: Tensor,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = indices.long()
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, _ = self.dataset[int(self.indices[index])]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[index])


class _WithoutIndex(Dataset):
    """``(input, target)`` view of a :class:`NoisyLabels` (drops the index) for evaluation."""

    def __init__(self, noisy: NoisyLabels) -> None:
        self.noisy = noisy

    def __len__(self) -> int:
        return len(self.noisy)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, y, _ = self.noisy[index]
        return x, y


@dataclass
class DataSplits:
    """What a subclass's :meth:`NoisyLabelDataModule._build_splits` returns.

    Datasets yield ``(input, target)`` with the split's transforms applied; ``*_targets`` are
    their clean labels (read without loading inputs). ``val`` may be ``None`` (then the test
    split is used for validation), ``test`` may be ``None`` (no test split).
    """

    train: Dataset
    train_targets: Tensor
    val: Dataset | None = None
    val_targets: Tensor | None = None
    test: Dataset | None = None
    test_targets: Tensor | None = None


# --------------------------------------------------------------------------------------------
# The base DataModule
# --------------------------------------------------------------------------------------------
class NoisyLabelDataModule(pl.LightningDataModule):
    """Base of the DataModules: label noise on the training split and deterministic loaders.

    Subclasses implement :meth:`_build_splits` and the ``num_classes`` / ``in_chans`` /
    ``image_size`` properties (available right after ``__init__``, so LightningCLI can link
    them to the model's arguments).

    After ``setup()`` (any stage; it builds every split once and is idempotent):

    * ``train_dataset`` is a :class:`NoisyLabels` yielding ``(input, noisy_target, index)``,
      ``index`` being the position in the training split;
    * ``val_dataset`` and ``test_dataset`` yield ``(input, target)`` with clean targets, unless
      ``noisy_validation=True`` (then the validation targets carry the same kind of noise,
      drawn with a different seed);
    * ``noise_mask`` and ``clean_targets`` describe the training split (for metrics and
      reports only, never for a method).

    Accessing these before ``setup()`` runs ``setup()``.

    :meth:`set_train_indices` restricts the training loader to a subset of the training split
    (Late Stopping's shrinking training set); indices stay positions in the full split.

    Args:
        noise: the :class:`~lightning_noise.data.noise.LabelNoise` of the training split (kind,
            rate, seed and the kind's options). The default ``LabelNoise()`` means clean
            labels; the recipes set e.g. ``noise: {kind: symmetric, rate: 0.4}``. With
            ``kind="asymmetric"`` and no ``class_map``, the dataset's standard map is used
            (e.g. the CIFAR-10 map of Patrini et al. 2017). ``kind="given"`` is only valid for
            DataModules that read human noisy labels (CIFAR-N).
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes (persistent when > 0).
        noisy_validation: corrupt the validation split with the same kind of noise, drawn with
            another seed (a clean validation set is a luxury in practice). Needs a validation
            split of its own.
        val_fraction: fraction of the training pool held out for validation (``0``: validate on
            the test split). ``None`` lets a subclass choose.
        seed: seed of the train/val/test split and of the per-epoch shuffling order.
        augment: train-time augmentation (subclass-specific).
        drop_last: drop the last incomplete training batch.
        pin_memory: DataLoader ``pin_memory``.
        threshold_samples: AUM's threshold samples (Pleiss et al. 2020) for
            ``LabelAudit(score="aum", threshold="auto")``: 0 (default) for none; ``k >= 1``
            relabels the ``k``-th disjoint set of ``N // (C + 1)`` training samples to the
            fake class ``C`` (:class:`~lightning_noise.data.threshold.ThresholdSamples`). The
            model then needs ``C + 1`` outputs: :attr:`model_num_classes`, which the
            ``lightning-noise`` command links to the model. Run ``k = 1`` and ``k = 2`` to
            give every sample a verdict.
    """

    #: Whether this DataModule can supply human noisy labels for ``kind="given"``.
    _supports_given_noise = False
    #: ``class_map`` used for ``kind="asymmetric"`` when none is given (``None``: the
    #: CIFAR-10 map of :func:`~lightning_noise.data.noise.asymmetric_noise`).
    _default_class_map: Mapping[int, int] | None = None

    def __init__(
        self,
        *,
        noise: LabelNoise = LabelNoise(),  # noqa: B008 - frozen, so one shared default is safe
        batch_size: int = 64,
        num_workers: int = 0,
        noisy_validation: bool = False,
        val_fraction: float | None = None,
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
        pin_memory: bool = False,
        threshold_samples: int = 0,
    ) -> None:
        super().__init__()
        noise = _as_label_noise(noise)
        # Collects the arguments of the whole __init__ chain (subclass included) into
        # ``self.hparams``, which Lightning stores in checkpoints and loggers; the noise is
        # stored as a plain dict so that a checkpoint loads with weights_only=True and
        # hparams.yaml stays plain YAML (load_from_checkpoint passes the dict back here).
        self.save_hyperparameters()
        self.save_hyperparameters({**self.hparams, "noise": dataclasses.asdict(noise)})
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        if noise.kind == "given" and not self._supports_given_noise:
            raise ValueError(
                f"kind='given' needs human noisy labels, which {type(self).__name__} cannot "
                "supply; use CIFAR10DataModule/CIFAR100DataModule with noisy_labels_file=, or "
                f"one of {tuple(t for t in NOISE_TYPES if t != 'given')}"
            )
        if noise.kind == "asymmetric" and noise.class_map is None and self._default_class_map:
            noise = dataclasses.replace(noise, class_map=dict(self._default_class_map))
        #: The label noise of the training split (with the dataset's default class map filled
        #: in for ``kind="asymmetric"``).
        self.noise = noise
        self.val_fraction = _check_fraction("val_fraction", val_fraction, optional=True)
        self.noisy_validation = bool(noisy_validation)
        if self.noisy_validation and self.val_fraction == 0.0:
            raise ValueError(
                "noisy_validation=True needs a validation split carved from the training data "
                "(with val_fraction=0 the test split is used for validation, and test labels "
                "are never corrupted); set val_fraction > 0, e.g. 0.1"
            )
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        self.pin_memory = bool(pin_memory)
        self.threshold_samples = check_int("threshold_samples", threshold_samples, minimum=0)
        self._train: NoisyLabels | None = None
        self._val: Dataset | None = None
        self._test: Dataset | None = None
        self._train_indices: Tensor | None = None
        self._is_set_up = False

    # ------------------------------------------------------------------ subclass interface
    @property
    def num_classes(self) -> int:
        """Number of classes (available right after ``__init__``)."""
        raise NotImplementedError

    @property
    def in_chans(self) -> int:
        """Input channels of the images the loaders yield."""
        raise NotImplementedError

    @property
    def image_size(self) -> int | None:
        """Height = width of the images the loaders yield (``None`` if they vary)."""
        raise NotImplementedError

    def _build_splits(self) -> DataSplits:
        """Read the data and return the train/val/test datasets (called once, by ``setup``)."""
        raise NotImplementedError

    def _noise_features(self, split: str) -> Tensor | None:
        """Features for ``noise="instance"`` of ``split`` ("train" or "val").

        ``None`` lets :class:`NoisyLabels` use the flattened dataset inputs, which would include
        any augmentation; subclasses return the un-augmented inputs instead.
        """
        return None

    def _given_noisy_targets(self, split: str) -> Tensor:
        """Human noisy labels of ``split`` ("train" or "val") for ``noise="given"``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ setup and datasets
    def setup(self, stage: str | None = None) -> None:
        """Build every split once (any ``stage``); later calls do nothing."""
        if self._is_set_up:
            return
        splits = self._build_splits()
        self._check_not_empty(splits)
        self._train = self._with_noise(splits.train, splits.train_targets, "train")
        if self.threshold_samples:
            # The fake class wraps the noisy labels; noise_mask & co. still describe the real ones.
            self._train = ThresholdSamples(  # type: ignore[assignment]
                self._train, self.num_classes, set_index=self.threshold_samples, seed=self.seed
            )
        if splits.val is not None:
            if self.noisy_validation:
                self._val = _WithoutIndex(self._with_noise(splits.val, splits.val_targets, "val"))
            else:
                self._val = splits.val
        elif self.noisy_validation:
            raise ValueError(
                f"noisy_validation=True but {type(self).__name__} has no validation split of "
                "its own (the test split would be used); set val_fraction > 0 or add a val/ "
                "folder"
            )
        else:
            # No held-out validation split: validate on the test split (documented per class).
            self._val = splits.test
        self._test = splits.test
        self._is_set_up = True

    def _check_not_empty(self, splits: DataSplits) -> None:
        """Refuse an empty split at setup (PyTorch would say "num_samples=0" at the first epoch)."""
        for split, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            if dataset is not None and len(dataset) == 0:  # type: ignore[arg-type]
                raise ValueError(
                    f"the {split} split of {type(self).__name__} is empty: "
                    f"{self._empty_split_hint(split)}"
                )

    def _empty_split_hint(self, split: str) -> str:
        """Why ``split`` may be empty and the fix (subclasses name their files or folders)."""
        if split == "train":
            return "the data holds no samples, or val_fraction/test_fraction take them all"
        return f"the data holds no {split} samples; raise {split}_fraction or add {split} data"

    def _with_noise(self, dataset: Dataset, targets: Tensor | None, split: str) -> NoisyLabels:
        noise = self.noise
        if noise.kind == "given":
            return NoisyLabels(
                dataset,
                noise,
                num_classes=self.num_classes,
                targets=targets,
                noisy_targets=self._given_noisy_targets(split),
            )
        if split != "train":
            noise = dataclasses.replace(noise, seed=noise.seed + _VAL_NOISE_SEED_OFFSET)
        features = self._noise_features(split) if noise.kind == "instance" else None
        return NoisyLabels(
            dataset, noise, num_classes=self.num_classes, targets=targets, features=features
        )

    def _ensure_setup(self) -> None:
        if not self._is_set_up:
            self.setup("fit")

    @property
    def train_dataset(self) -> NoisyLabels:
        """Training split as :class:`NoisyLabels`: ``(input, noisy_target, index)``."""
        self._ensure_setup()
        assert self._train is not None
        return self._train

    @property
    def val_dataset(self) -> Dataset | None:
        """Validation split, ``(input, target)``; the test split when there is no own split."""
        self._ensure_setup()
        return self._val

    @property
    def test_dataset(self) -> Dataset | None:
        """Test split, ``(input, target)`` with clean targets (``None`` if there is none)."""
        self._ensure_setup()
        return self._test

    @property
    def model_num_classes(self) -> int:
        """Outputs the model needs: ``num_classes``, plus one with ``threshold_samples``."""
        return self.num_classes + (1 if self.threshold_samples else 0)

    @property
    def threshold_mask(self) -> Tensor | None:
        """Boolean ``[N_train]``: AUM's threshold samples (``None`` without them)."""
        return getattr(self.train_dataset, "threshold_mask", None)

    @property
    def noise_mask(self) -> Tensor:
        """Boolean ``[N_train]``: where the training label was corrupted."""
        return self.train_dataset.noise_mask

    @property
    def clean_targets(self) -> Tensor:
        """Clean int64 ``[N_train]`` labels of the training split."""
        return self.train_dataset.clean_targets

    @property
    def noisy_targets(self) -> Tensor:
        """Int64 ``[N_train]`` labels served for training."""
        return self.train_dataset.noisy_targets

    # ------------------------------------------------------------------ loaders
    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of the data-parallel group of the attached trainer."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        # Lightning's own notion of the data-parallel group: {num_replicas, rank} for parallel
        # strategies (world size and global rank under DDP), None for single-device ones.
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
        if kwargs:
            return int(kwargs["num_replicas"]), int(kwargs["rank"])
        return 1, 0

    def set_train_indices(self, indices: Tensor | Sequence[int] | None) -> None:
        """Serve only these samples of the training split from now on (``None``: all of them).

        The next :meth:`train_dataloader` iterates a ``Subset`` of :attr:`train_dataset`, so
        left-out samples are never loaded, on any rank; batches keep yielding each sample's
        index in the full training split. A trainer only calls :meth:`train_dataloader` again
        when it reloads its training loader (Late Stopping makes it do so).

        Raises:
            ValueError: when an index is outside the training split or repeats.
        """
        if indices is None:
            self._train_indices = None
            return
        index = torch.as_tensor(indices).reshape(-1)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"indices must be integers, got dtype {index.dtype}")
        index = index.long().cpu()
        n = len(self.train_dataset)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"indices must be positions in the training split [0, {n})")
        if torch.unique(index).numel() != index.numel():
            raise ValueError("indices must not repeat")
        self._train_indices = index.clone()

    @property
    def train_indices(self) -> Tensor | None:
        """Positions served by :meth:`train_dataloader` (``None``: the whole training split)."""
        return None if self._train_indices is None else self._train_indices.clone()

    def _train_sampler(
        self, num_replicas: int = 1, rank: int = 0, dataset: Dataset | None = None
    ) -> DistributedSampler:
        # An explicit DistributedSampler, also on one process: Lightning keeps a
        # DistributedSampler it finds (it only injects its own when the sampler is not one) and
        # calls ``set_epoch(epoch)`` on it at the start of every epoch, from the checkpointed
        # epoch counter. So the order of an epoch depends only on (seed, epoch): a resumed run
        # sees exactly the batches the uninterrupted run would have seen, and the DDP shards
        # are deterministic and disjoint (up to the padding that evens out the shard sizes).
        return ResumableSampler(
            self.train_dataset if dataset is None else dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            drop_last=False,
        )

    def _loader(self, dataset: Dataset, *, sampler: Any = None, train: bool) -> DataLoader:
        # Training loaders are stateful (torchdata): Lightning saves their position in every
        # checkpoint, so a run resumed from the middle of an epoch continues with the next
        # batch of the same order instead of restarting the epoch.
        loader_class = StatefulDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last if train else False,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(input, noisy_target, index)`` (order from seed, epoch).

        Over the samples chosen by :meth:`set_train_indices`, when it was called.
        """
        num_replicas, rank = self._replicas()
        dataset: Dataset = self.train_dataset
        if self._train_indices is not None:
            dataset = Subset(dataset, self._train_indices.tolist())
        sampler = self._train_sampler(num_replicas, rank, dataset)
        return self._loader(dataset, sampler=sampler, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches ``(input, target)`` in order; ``[]`` when there is no split."""
        dataset = self.val_dataset
        return [] if dataset is None else self._loader(dataset, train=False)

    def test_dataloader(self) -> DataLoader | list:
        """Test batches ``(input, target)`` in order; ``[]`` when there is no test split."""
        dataset = self.test_dataset
        return [] if dataset is None else self._loader(dataset, train=False)
