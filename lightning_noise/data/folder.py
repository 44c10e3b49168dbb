"""A DataModule over the user's own folder of images (torchvision ``ImageFolder`` layout)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes, pil_loader

from lightning_noise._validate import check_int
from lightning_noise.data.base import (
    DataSplits,
    NoisyLabelDataModule,
    TransformedSubset,
    _check_fraction,
    _split_size,
    stratified_split,
)

__all__ = ["ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resize the short side to image_size / 0.875 before the centre crop (the classic
# 256 -> 224 evaluation transform of ImageNet models).
_EVAL_CROP_RATIO = 0.875
# Side of the thumbnails used as instance-noise features (un-augmented, so the noisy labels do
# not depend on image_size or augmentation, and small enough to hold for large folders).
_FEATURE_SIZE = 32

_LAYOUT = """\
expected one of these layouts (class-named subfolders holding the images):
  {root}/train/<class>/*.png   (+ optional {root}/val/<class>/..., {root}/test/<class>/...)
  {root}/<class>/*.png         (split into train/val/test by val_fraction/test_fraction)"""


# At most this many bad files are listed by ``verify_images=True`` (then a count of the rest).
_MAX_LISTED = 10


def _load_image(path: str) -> Any:
    """PIL's RGB loader; an image that does not decode raises an ``OSError`` naming its path.

    A module-level function so DataLoader workers can pickle it.
    """
    try:
        return pil_loader(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        reason = f"{type(err).__name__}: {err}"
    raise OSError(
        f"cannot decode image {path!r} ({reason}); replace or remove the file (pass "
        "verify_images=True to ImageFolderDataModule to list every bad file at setup)"
    )


class _ClassListImageFolder(ImageFolder):
    """``ImageFolder`` that uses a given class list, so val/test indices match train's."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self._fixed_classes = list(classes)
        # allow_empty: a val/ or test/ folder may lack some classes.
        super().__init__(root, loader=_load_image, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


class ImageFolderDataModule(NoisyLabelDataModule):
    """Your own images, in class-named folders, with synthetic label noise on the train split.

    Two layouts are understood (``data_dir`` is the root):

    * ``data_dir/train/<class>/...`` with optional ``data_dir/val/<class>/...`` and
      ``data_dir/test/<class>/...``: a split that has its own folder is used as is; a missing
      one is carved from ``train/`` by ``val_fraction`` / ``test_fraction``;
    * ``data_dir/<class>/...`` (no ``train/`` folder): one pool split into train/val/test by
      ``val_fraction`` (default 0.1) and ``test_fraction`` (default 0).

    Carved splits are stratified and drawn from ``seed``. Class indices follow the sorted class
    folder names of the training pool (torchvision's convention); ``num_classes`` is read from
    the folder listing right after ``__init__``. Images are loaded with PIL as RGB, normalised
    with the ImageNet mean/std; evaluation resizes the short side to ``image_size / 0.875`` and
    centre-crops ``image_size``; training (``augment=True``) uses a random resized crop and a
    horizontal flip. With no validation split at all, validation runs on the test split, and
    with neither there is no validation. Instance-dependent noise uses 32x32 thumbnails of the
    training images as features (loaded once).

    Bad data is refused at ``setup``: no class folders, no images, an empty split (e.g. an
    empty ``val/`` folder). Images are decoded only when a batch needs them, so by default a
    corrupt image is found when it is first loaded, mid-epoch: the error then names its path.
    ``verify_images=True`` decodes every image of every split once at ``setup`` and reports all
    bad files at once (their paths, the first 10 listed); it costs one full decode per image,
    about as long as one epoch's image loading without the transforms.

    Args:
        data_dir: the root folder, see the layouts above.
        image_size: side of the served square images.
        val_fraction: fraction of the training pool held out for validation (``None``: 0.1
            when there is no ``val/`` folder; giving a value while ``val/`` exists is an error).
        test_fraction: fraction held out for testing (``None``: 0 when there is no ``test/``
            folder; giving a value while ``test/`` exists is an error).
        augment: random resized crop + horizontal flip on the training split.
        verify_images: decode every image once at ``setup`` and refuse the data, listing every
            file that does not decode (default ``False``: a bad file fails when first loaded).
        **kwargs: the shared arguments of
            :class:`~lightning_noise.data.base.NoisyLabelDataModule`: ``noise`` (a
            :class:`~lightning_noise.data.noise.LabelNoise`), ``batch_size``, ``num_workers``,
            ``noisy_validation``, ``seed`` (of the carved splits and of the shuffling order),
            ``drop_last``, ``pin_memory``.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        image_size: int = 224,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        augment: bool = True,
        verify_images: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(val_fraction=val_fraction, augment=augment, **kwargs)
        self.data_dir = str(data_dir)
        self.verify_images = bool(verify_images)
        self._image_size = check_int("image_size", image_size, minimum=1)
        self.test_fraction = _check_fraction("test_fraction", test_fraction, optional=True)
        self._features: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ layout
    @property
    def _root(self) -> Path:
        return Path(self.data_dir).expanduser()

    def _split_folder(self, name: str) -> Path | None:
        folder = self._root / name
        return folder if folder.is_dir() else None

    @property
    def _train_root(self) -> Path:
        root = self._root
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(root)!r} not found; " + _LAYOUT.format(root=root)
            )
        train = self._split_folder("train")
        if train is not None:
            return train
        for name in ("val", "test"):
            if self._split_folder(name) is not None:
                raise FileNotFoundError(
                    f"{str(root)!r} has a {name}/ folder but no train/ folder; "
                    + _LAYOUT.format(root=root)
                )
        return root

    @cached_property
    def classes(self) -> list[str]:
        """Class names: the sorted class folders of the training pool."""
        train_root = self._train_root
        try:
            names, _ = find_classes(str(train_root))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"no class folders in {str(train_root)!r} ({err}); "
                + _LAYOUT.format(root=self._root)
            ) from err
        if len(names) < 2:
            raise ValueError(
                f"{str(train_root)!r} has {len(names)} class folder(s) ({names}); a "
                "classification dataset needs at least 2"
            )
        return names

    @property
    def num_classes(self) -> int:
        """Number of class folders (read from the folder listing, no image is opened)."""
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        """3 (images are converted to RGB)."""
        return 3

    @property
    def image_size(self) -> int:
        """``image_size``."""
        return self._image_size

    # ------------------------------------------------------------------ transforms
    def _train_transform(self) -> Any:
        if not self.augment:
            return self._eval_transform()
        return T.Compose(
            [
                T.RandomResizedCrop(self._image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _eval_transform(self) -> Any:
        return T.Compose(
            [
                T.Resize(round(self._image_size / _EVAL_CROP_RATIO)),
                T.CenterCrop(self._image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    # ------------------------------------------------------------------ splits
    def _resolve_fraction(self, name: str, given: float | None, default: float) -> float | None:
        """The fraction to carve for split ``name``, or ``None`` when it has its own folder."""
        if self._split_folder("train") is not None and self._split_folder(name) is not None:
            if given is not None:
                raise ValueError(
                    f"{name}_fraction={given!r} but {str(self._root / name)!r} exists; a split "
                    f"with its own folder is used as is, so drop {name}_fraction (or the folder)"
                )
            return None
        return default if given is None else given

    def _folder_split(self, name: str) -> tuple[_ClassListImageFolder, Tensor] | None:
        folder = self._split_folder(name)
        if folder is None or self._split_folder("train") is None:
            return None
        try:
            names = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise ValueError(
                f"the {name} split of {type(self).__name__} is empty: "
                f"{self._empty_split_hint(name)}"
            ) from None
        extra = sorted(set(names) - set(self.classes))
        if extra:
            raise ValueError(
                f"{str(folder)!r} has class folders {extra} that train/ lacks; every class must "
                "have training images"
            )
        dataset = _ClassListImageFolder(str(folder), self.classes)
        return dataset, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def _build_splits(self) -> DataSplits:
        classes = self.classes
        val_fraction = self._resolve_fraction("val", self.val_fraction, 0.1)
        test_fraction = self._resolve_fraction("test", self.test_fraction, 0.0)
        pool = _ClassListImageFolder(str(self._train_root), classes)
        pool_targets = torch.as_tensor(pool.targets, dtype=torch.int64)
        n = pool_targets.shape[0]
        if n == 0:
            raise FileNotFoundError(
                f"no images found under {str(self._train_root)!r}; "
                + _LAYOUT.format(root=self._root)
            )
        n_val = _split_size(val_fraction or 0.0, n)
        n_test = _split_size(test_fraction or 0.0, n)
        train_idx, val_idx, test_idx = stratified_split(pool_targets, n_val, n_test, seed=self.seed)
        train_tf, eval_tf = self._train_transform(), self._eval_transform()

        def carved(idx: Tensor, tf: Any) -> tuple[TransformedSubset, Tensor] | None:
            if idx.numel() == 0:
                return None
            return TransformedSubset(pool, idx, pool_targets[idx], tf), pool_targets[idx]

        def own(name: str) -> tuple[TransformedSubset, Tensor] | None:
            found = self._folder_split(name)
            if found is None:
                return None
            dataset, targets = found
            return TransformedSubset(dataset, torch.arange(len(dataset)), targets, eval_tf), targets

        train = TransformedSubset(pool, train_idx, pool_targets[train_idx], train_tf)
        val = own("val") or carved(val_idx, eval_tf)
        test = own("test") or carved(test_idx, eval_tf)
        if self.verify_images:
            self._verify([pool, *(s[0].dataset for s in (val, test) if s is not None)])
        if self.noise.kind == "instance":
            self._features["train"] = self._thumbnails(pool, train_idx)
            if val is not None:
                self._features["val"] = self._thumbnails(val[0].dataset, val[0].indices)
        return DataSplits(
            train=train,
            train_targets=train.targets,
            val=None if val is None else val[0],
            val_targets=None if val is None else val[1],
            test=None if test is None else test[0],
            test_targets=None if test is None else test[1],
        )

    @staticmethod
    def _verify(datasets: list[ImageFolder]) -> None:
        """Decode every image once; ``ValueError`` listing the files that do not decode."""
        paths = dict.fromkeys(path for ds in datasets for path, _ in ds.samples)
        bad: list[str] = []
        for path in paths:
            try:
                pil_loader(path)
            except Exception as err:
                bad.append(f"  {path} ({type(err).__name__}: {err})")
        if bad:
            more = len(bad) - _MAX_LISTED
            listed = "\n".join(bad[:_MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")
            raise ValueError(
                f"{len(bad)} of {len(paths)} images do not decode (verify_images=True); replace "
                f"or remove them:\n{listed}"
            )

    def _empty_split_hint(self, split: str) -> str:
        folder = self._split_folder(split) if self._split_folder("train") is not None else None
        if folder is not None:
            return (
                f"{str(folder)!r} holds no images; add images under {split}/<class>/ or remove "
                "the folder"
            )
        return super()._empty_split_hint(split)

    @staticmethod
    def _thumbnails(dataset: ImageFolder, indices: Tensor) -> Tensor:
        to_tensor = T.Compose([T.Resize((_FEATURE_SIZE, _FEATURE_SIZE)), T.ToTensor()])
        rows = [to_tensor(dataset.loader(dataset.samples[int(i)][0])) for i in indices]
        return torch.stack(rows) if rows else torch.zeros(0, 3, _FEATURE_SIZE, _FEATURE_SIZE)

    def _noise_features(self, split: str) -> Tensor | None:
        return self._features.get(split)
