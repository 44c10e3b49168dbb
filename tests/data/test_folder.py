"""Tests for ``ImageFolderDataModule`` on tiny PNG folders written with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _formats import IMAGE_CLASSES, write_images

from lightning_noise.data import LabelNoise
from lightning_noise.data.folder import ImageFolderDataModule

CLASSES = IMAGE_CLASSES


@pytest.fixture
def split_root(tmp_path: Path) -> Path:
    write_images(tmp_path / "train", 6)
    write_images(tmp_path / "val", 2)
    write_images(tmp_path / "test", 1, classes=("cat", "fox"))  # a class may be missing
    return tmp_path


def test_num_classes_without_setup(split_root: Path) -> None:
    dm = ImageFolderDataModule(str(split_root), image_size=16)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (3, 3, 16)
    assert dm.classes == list(CLASSES)
    assert dm._train is None


def test_train_val_test_folders(split_root: Path) -> None:
    dm = ImageFolderDataModule(
        str(split_root), image_size=16, augment=False, noise=LabelNoise(rate=0.5)
    )
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (18, 6, 2)
    x, _, i = dm.train_dataset[7]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and i == 7
    assert dm.train_dataset.clean_targets[7] == 1  # sorted folders: cat, dog, fox
    # test/ lacks "dog": fox keeps index 2 (the training class list is used)
    assert [dm.test_dataset[k][1] for k in range(2)] == [0, 2]
    assert torch.equal(dm.clean_targets, torch.arange(3).repeat_interleave(6))
    assert dm.noise_mask.any()
    # ImageNet normalisation of a constant image: red channel = (r / 255 - 0.485) / 0.229
    xv, yv = dm.val_dataset[5]  # fox, k = 1: red 21
    assert yv == 2
    assert torch.allclose(xv[0], torch.full((16, 16), (21 / 255 - 0.485) / 0.229), atol=1e-2)


def test_single_folder_split(tmp_path: Path) -> None:
    write_images(tmp_path, 10)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.1)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (21, 6, 3)
    val_targets = sorted(dm.val_dataset[k][1] for k in range(6))
    assert val_targets == [0, 0, 1, 1, 2, 2]  # stratified

    def reds(dataset, n):
        # eval transform is deterministic: recover the red value (10 * class + k)
        return {round(float(dataset[k][0][0, 0, 0] * 0.229 + 0.485) * 255) for k in range(n)}

    train_eval = ImageFolderDataModule(
        str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.1, augment=False
    )
    train = reds(train_eval.train_dataset, 21)
    val, test = reds(dm.val_dataset, 6), reds(dm.test_dataset, 3)
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 30


def test_single_folder_defaults_and_determinism(tmp_path: Path) -> None:
    write_images(tmp_path, 10)
    a = ImageFolderDataModule(str(tmp_path), image_size=8, noise=LabelNoise(rate=0.4), seed=1)
    assert len(a.val_dataset) == 3 and a.test_dataset is None  # defaults: 10% val, no test
    assert a.test_dataloader() == []
    b = ImageFolderDataModule(str(tmp_path), image_size=8, noise=LabelNoise(rate=0.4), seed=1)
    assert torch.equal(a.noisy_targets, b.noisy_targets)
    assert torch.equal(a.train_dataset.dataset.indices, b.train_dataset.dataset.indices)
    c = ImageFolderDataModule(str(tmp_path), image_size=8, noise=LabelNoise(rate=0.4), seed=2)
    assert not torch.equal(a.train_dataset.dataset.indices, c.train_dataset.dataset.indices)


def test_train_dataloader_with_augmentation(split_root: Path) -> None:
    dm = ImageFolderDataModule(
        str(split_root), image_size=12, batch_size=8, noise=LabelNoise(rate=0.3)
    )
    seen = []
    for x, y, idx in dm.train_dataloader():
        assert x.shape[1:] == (3, 12, 12)
        assert torch.equal(y, dm.train_dataset.noisy_targets[idx])
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(18))
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 12, 12) and torch.equal(y, torch.tensor([0, 0, 1, 1, 2, 2]))


def test_instance_noise_uses_thumbnails(split_root: Path) -> None:
    noise = LabelNoise("instance", 0.5)
    dm = ImageFolderDataModule(str(split_root), image_size=8, noise=noise)
    assert dm.noisy_targets.shape == (18,)
    assert dm._features["train"].shape == (18, 3, 32, 32)  # un-augmented 32x32 thumbnails
    again = ImageFolderDataModule(str(split_root), image_size=24, noise=noise)
    assert torch.equal(again.noisy_targets, dm.noisy_targets)  # independent of image_size


def test_missing_folder_explains_layout(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"(?s)not found.*train/<class>"):
        _ = dm.num_classes
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        _ = ImageFolderDataModule(str(tmp_path / "empty")).num_classes
    write_images(tmp_path / "only_val" / "val", 1)
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        ImageFolderDataModule(str(tmp_path / "only_val")).setup("fit")


def test_fraction_with_own_folder_is_an_error(split_root: Path) -> None:
    dm = ImageFolderDataModule(str(split_root), val_fraction=0.2)
    with pytest.raises(ValueError, match=r"val_fraction=0\.2 but .*val' exists"):
        dm.setup("fit")


def test_extra_class_in_val_is_an_error(split_root: Path) -> None:
    write_images(split_root / "val", 1, classes=("emu",))
    with pytest.raises(ValueError, match=r"\['emu'\]"):
        ImageFolderDataModule(str(split_root)).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be an integer >= 1, got 0"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\), got 1.0"),
        ({"noise": LabelNoise("given")}, "given"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(str(tmp_path), **kwargs)


# ------------------------------------------------------------------------------ bad images
def _corrupt(path: Path, how: str) -> Path:
    """Spoil an image: random bytes under its name, or its first half only (truncated)."""
    if how == "random":
        rng = np.random.default_rng(len(str(path)))
        path.write_bytes(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_bad_image_at_load_time_names_its_path(split_root: Path, how: str) -> None:
    bad = _corrupt(split_root / "train" / "dog" / "003.png", how)
    dm = ImageFolderDataModule(str(split_root), image_size=8, augment=False)
    dm.setup("fit")  # by default images are not decoded at setup
    with pytest.raises(OSError, match="cannot decode image") as err:
        for k in range(len(dm.train_dataset)):
            dm.train_dataset[k]
    assert repr(str(bad)) in str(err.value) and "verify_images=True" in str(err.value)
    with pytest.raises(OSError, match="cannot decode image") as err:
        for _ in dm.train_dataloader():
            pass
    assert str(bad) in str(err.value)


def test_verify_images_lists_every_bad_file_at_setup(split_root: Path) -> None:
    bad = [
        _corrupt(split_root / "train" / c / f"{k:03d}.png", "random")
        for c in CLASSES
        for k in range(4)
    ]
    bad.append(_corrupt(split_root / "val" / "fox" / "001.png", "truncated"))
    dm = ImageFolderDataModule(str(split_root), image_size=8, verify_images=True)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "13 of 26 images do not decode" in message
    listed = [path for path in bad if str(path) in message]
    assert listed == bad[:10]  # the first 10 in scan order
    assert "... and 3 more" in message


def test_verify_images_passes_good_data_and_is_off_by_default(split_root: Path) -> None:
    dm = ImageFolderDataModule(str(split_root), image_size=8, verify_images=True)
    dm.setup("fit")
    assert len(dm.train_dataset) == 18
    _corrupt(split_root / "test" / "cat" / "000.png", "random")
    ImageFolderDataModule(str(split_root), image_size=8).setup("fit")  # no decode at setup
    with pytest.raises(ValueError, match=r"1 of 26 images do not decode(?s:.*)test/cat/000\.png"):
        ImageFolderDataModule(str(split_root), image_size=8, verify_images=True).setup("fit")


@pytest.mark.parametrize("layout", ["empty class folders", "no class folders"])
def test_empty_val_folder_names_the_folder(split_root: Path, layout: str) -> None:
    for image in (split_root / "val").rglob("*.png"):
        image.unlink()
    if layout == "no class folders":
        for folder in (split_root / "val").iterdir():
            folder.rmdir()
    with pytest.raises(ValueError, match="the val split of ImageFolderDataModule is empty") as err:
        ImageFolderDataModule(str(split_root), image_size=8).setup("fit")
    assert repr(str(split_root / "val")) in str(err.value)
    assert "num_samples" not in str(err.value)
