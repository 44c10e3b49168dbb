"""The embedded default dataset: scikit-learn's bundled handwritten digits with label noise.

1,797 real 8x8 grey images of the digits 0-9 ship inside scikit-learn, so every recipe runs
with no download in seconds on a laptop CPU. The images are resized once, kept in memory as
tensors, and served as float32 ``[C, H, W]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_noise._validate import check_choice, check_int
from lightning_noise.data.base import (
    DataSplits,
    NoisyLabelDataModule,
    TensorImageDataset,
    _check_fraction,
    _split_size,
    random_crop_with_padding,
    stratified_split,
)

__all__ = ["DIGITS_ASYMMETRIC_MAP", "DigitsDataModule"]

#: Asymmetric noise between similar-looking digits, the MNIST map of Patrini et al. (2017):
#: 2->7, 3->8, 5<->6, 7->1. The default ``class_map`` of :class:`DigitsDataModule`.
DIGITS_ASYMMETRIC_MAP = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}

_NUM_SAMPLES = 1797  # len(sklearn.datasets.load_digits().target)
_NUM_CLASSES = 10
_NATIVE_SIZE = 8


class _DigitsTransform:
    """Per-image transform: optional random translation, then grey -> ``channels`` channels.

    A module-level class (not a lambda) so that DataLoader workers can pickle it.
    """

    def __init__(self, channels: int, padding: int, fill: float) -> None:
        self.channels = channels
        self.padding = padding
        self.fill = fill

    def __call__(self, image: Tensor) -> Tensor:
        if self.padding:
            # Pad with the (standardised) background value: a translation by up to one native
            # pixel, the digit never touches a padded edge of another colour.
            image = random_crop_with_padding(image, self.padding, self.fill)
        if self.channels != image.shape[0]:
            image = image.expand(self.channels, -1, -1)
        return image


class DigitsDataModule(NoisyLabelDataModule):
    """scikit-learn's handwritten digits (``load_digits``) with synthetic label noise.

    A stratified train/val/test split is drawn from ``seed``; images are scaled to ``[0, 1]``,
    resized (bilinear, once up front) to ``image_size``, replicated to ``channels`` channels
    (3 for timm backbones) and standardised with the training split's mean and std. Label noise
    applies to the training split only (and to the validation split with
    ``noisy_validation=True``).

    The default ``noise=LabelNoise()`` gives clean labels; the default recipe uses 40%
    symmetric noise (``noise=LabelNoise("symmetric", rate=0.4)``, in YAML
    ``noise: {kind: symmetric, rate: 0.4}``). For ``kind="asymmetric"`` the default
    ``class_map`` is :data:`DIGITS_ASYMMETRIC_MAP`.

    Args:
        image_size: side of the served images (the native size is 8).
        channels: 1 (grey) or 3 (grey replicated, for ImageNet-style backbones).
        val_fraction: fraction of the 1,797 images held out for validation (``0``: validate on
            the test split).
        test_fraction: fraction held out for testing.
        augment: random translation by up to one native pixel (train split only).
        **kwargs: the shared arguments of :class:`NoisyLabelDataModule`: ``noise`` (a
            :class:`~lightning_noise.data.noise.LabelNoise`), ``batch_size``, ``num_workers``,
            ``noisy_validation``, ``seed`` (of the split and of the shuffling order),
            ``drop_last``, ``pin_memory``.

    Example:
        >>> from lightning_noise.data import LabelNoise
        >>> dm = DigitsDataModule(noise=LabelNoise("symmetric", 0.4), image_size=16, channels=1)
        >>> dm.setup("fit")
        >>> x, y, i = dm.train_dataset[0]
        >>> tuple(x.shape), dm.num_classes, len(dm.train_dataset) + len(dm.val_dataset)
        ((1, 16, 16), 10, 1438)
        >>> round(dm.train_dataset.noise_rate, 1)
        0.4
    """

    _default_class_map = DIGITS_ASYMMETRIC_MAP

    def __init__(
        self,
        *,
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(val_fraction=val_fraction, augment=augment, **kwargs)
        self._image_size = check_int("image_size", image_size, minimum=_NATIVE_SIZE)
        self.channels = check_choice("channels", check_int("channels", channels), (1, 3))
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self._n_val = _split_size(self.val_fraction or 0.0, _NUM_SAMPLES)
        self._n_test = _split_size(self.test_fraction, _NUM_SAMPLES)
        n_train = _NUM_SAMPLES - self._n_val - self._n_test
        if n_train < _NUM_CLASSES:
            raise ValueError(
                f"val_fraction={val_fraction!r} + test_fraction={test_fraction!r} leave "
                f"{n_train} of {_NUM_SAMPLES} images for training; the two must sum to less "
                "than 1 (e.g. 0.15 and 0.2)"
            )
        #: Scalar mean / std of the training split's pixels (in [0, 1]), set by ``setup``.
        self.mean: float | None = None
        self.std: float | None = None
        self._raw_train: Tensor | None = None
        self._raw_val: Tensor | None = None

    @property
    def num_classes(self) -> int:
        """10 digit classes."""
        return _NUM_CLASSES

    @property
    def in_chans(self) -> int:
        """``channels``."""
        return self.channels

    @property
    def image_size(self) -> int:
        """``image_size``."""
        return self._image_size

    def _build_splits(self) -> DataSplits:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        digits = load_digits()
        raw = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
        targets = torch.as_tensor(digits.target, dtype=torch.int64)
        train_idx, val_idx, test_idx = stratified_split(
            targets, self._n_val, self._n_test, seed=self.seed
        )
        images = raw.unsqueeze(1)  # [N, 1, 8, 8]
        if self._image_size != _NATIVE_SIZE:
            images = F.interpolate(
                images, size=(self._image_size,) * 2, mode="bilinear", align_corners=False
            )
        train_images = images[train_idx]
        mean, std = float(train_images.mean()), float(train_images.std())
        self.mean, self.std = mean, std
        images = (images - mean) / std
        background = (0.0 - mean) / std
        padding = max(1, round(self._image_size / _NATIVE_SIZE)) if self.augment else 0
        train_tf = _DigitsTransform(self.channels, padding, background)
        eval_tf = _DigitsTransform(self.channels, 0, background)
        # Instance-dependent noise reads the native 8x8 pixels, so the noisy labels do not
        # depend on image_size, channels or augmentation.
        self._raw_train, self._raw_val = raw[train_idx], raw[val_idx]

        def subset(idx: Tensor, tf: _DigitsTransform) -> TensorImageDataset:
            return TensorImageDataset(images[idx].contiguous(), targets[idx], tf)

        has_val = val_idx.numel() > 0
        has_test = test_idx.numel() > 0
        return DataSplits(
            train=subset(train_idx, train_tf),
            train_targets=targets[train_idx],
            val=subset(val_idx, eval_tf) if has_val else None,
            val_targets=targets[val_idx] if has_val else None,
            test=subset(test_idx, eval_tf) if has_test else None,
            test_targets=targets[test_idx] if has_test else None,
        )

    def _noise_features(self, split: str) -> Tensor | None:
        return self._raw_train if split == "train" else self._raw_val
