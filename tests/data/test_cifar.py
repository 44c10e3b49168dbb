"""Tests for the CIFAR-10/100 DataModules on tiny batches written in the real pickle format."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _formats import (
    N_TRAIN_10,
    N_TRAIN_100,
    dump_pickle,
    images,
    train_labels_10,
    write_cifar10,
    write_cifar100,
)

from lightning_noise.data import LabelNoise
from lightning_noise.data.cifar import (
    CIFAR100_ASYMMETRIC_MAP,
    CIFAR10DataModule,
    CIFAR100DataModule,
    load_cifar_n_labels,
)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path / "cifar-10-batches-py")


@pytest.fixture
def cifar_n_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    clean = train_labels_10()
    rng = np.random.default_rng(0)
    labels = {"clean_label": clean.copy()}
    for key, rate in (("aggre_label", 0.1), ("worse_label", 0.4), ("random_label1", 0.2)):
        flip = rng.random(N_TRAIN_10) < rate
        labels[key] = np.where(flip, (clean + rng.integers(1, 10, N_TRAIN_10)) % 10, clean)
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save(labels, path)
    return path, labels


def _pixel_index(x: torch.Tensor, mean: float, std: float) -> int:
    """Recover the traceable first pixel (see ``_images``) from a normalised image."""
    return round(float(x[0, 0, 0] * std + mean) * 255)


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_loads_shapes_and_labels(cifar10_dir: Path, use_parent: bool) -> None:
    data_dir = cifar10_dir.parent if use_parent else cifar10_dir
    dm = CIFAR10DataModule(str(data_dir), augment=False)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 3, 32)
    dm.setup("fit")
    assert len(dm.train_dataset) == N_TRAIN_10 and len(dm.test_dataset) == 20
    assert dm.val_dataset is dm.test_dataset  # val_fraction=0: validate on the test split
    assert torch.equal(dm.clean_targets, torch.as_tensor(train_labels_10()))
    assert dm.classes[:2] == ["airplane", "automobile"]
    x, y, i = dm.train_dataset[13]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and (y, i) == (3, 13)
    # the pixels are the pickled ones, in the CHW order of the 3072-vector, normalised
    raw = torch.as_tensor(images(N_TRAIN_10)[13]).view(3, 32, 32).float() / 255
    mean = torch.tensor(CIFAR10DataModule._mean).view(3, 1, 1)
    std = torch.tensor(CIFAR10DataModule._std).view(3, 1, 1)
    assert torch.allclose(x * std + mean, raw, atol=1e-5)
    xt, yt = dm.test_dataset[4]
    assert xt.shape == (3, 32, 32) and yt == 4


def test_cifar10_validation_split(cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(str(cifar10_dir), val_fraction=0.2, augment=False, seed=3)
    assert len(dm.train_dataset) == 80 and len(dm.val_dataset) == 20
    val_targets = torch.tensor([dm.val_dataset[i][1] for i in range(20)])
    assert torch.equal(torch.bincount(val_targets, minlength=10), torch.full((10,), 2))
    train_ids = {_pixel_index(dm.train_dataset[i][0], 0.4914, 0.2470) for i in range(80)}
    val_ids = {_pixel_index(dm.val_dataset[i][0], 0.4914, 0.2470) for i in range(20)}
    assert not train_ids & val_ids and len(train_ids | val_ids) == N_TRAIN_10


def test_cifar10_augmentation(cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(str(cifar10_dir))  # augment=True is the CIFAR default
    torch.manual_seed(0)
    draws = [dm.train_dataset[0][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(dm.test_dataset[0][0], dm.test_dataset[0][0])


def test_cifar10_train_dataloader(cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(str(cifar10_dir), noise=LabelNoise(rate=0.5), batch_size=32)
    seen = []
    for x, y, idx in dm.train_dataloader():
        assert x.shape[1:] == (3, 32, 32)
        assert torch.equal(y, dm.train_dataset.noisy_targets[idx])
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(N_TRAIN_10))
    assert dm.noise_mask.any()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (20, 3, 32, 32) and torch.equal(y, torch.arange(20) % 10)


def test_cifar100_loads_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")
    dm = CIFAR100DataModule(str(tmp_path))
    assert dm.num_classes == 100
    assert torch.equal(dm.clean_targets, torch.arange(N_TRAIN_100) % 100)
    assert dm.classes[99] == "c99"
    assert dm.test_dataset[42][1] == 42 and dm.train_dataset[0][0].shape == (3, 32, 32)


def test_cifar100_asymmetric_default_map(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")
    dm = CIFAR100DataModule(str(tmp_path), noise=LabelNoise("asymmetric", 0.6))
    assert dm.noise.class_map == CIFAR100_ASYMMETRIC_MAP
    assert CIFAR100_ASYMMETRIC_MAP[4] == 0 and CIFAR100_ASYMMETRIC_MAP[7] == 8
    ds = dm.train_dataset
    assert ds.noise_mask.any()
    expected = torch.tensor([CIFAR100_ASYMMETRIC_MAP[int(c)] for c in ds.clean_targets])
    assert torch.equal(ds.noisy_targets[ds.noise_mask], expected[ds.noise_mask])


def test_missing_directory_says_what_to_put_there(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    for expected in (
        "data_batch_1",
        "data_batch_5",
        "test_batch",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
    ):
        assert expected in message
    with pytest.raises(FileNotFoundError, match=r"'train', 'test'|train, test"):
        CIFAR100DataModule(str(tmp_path)).setup("fit")


def test_missing_file_is_named(cifar10_dir: Path) -> None:
    (cifar10_dir / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing: data_batch_3"):
        CIFAR10DataModule(str(cifar10_dir.parent)).setup("fit")


def test_unpickler_refuses_foreign_objects(cifar10_dir: Path) -> None:
    batch = {b"labels": [0] * 20, b"data": images(20), b"extra": collections.OrderedDict()}
    dump_pickle(cifar10_dir / "data_batch_2", batch)
    with pytest.raises(ValueError, match=r"refusing to load collections\.OrderedDict") as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    assert str(cifar10_dir / "data_batch_2") in str(err.value)


# ------------------------------------------------------------------------------ bad files
def _not_a_batch(err: pytest.ExceptionInfo, path: Path, archive: str) -> str:
    """The message of a bad batch: it names the file, says what it is not and the fix."""
    message = str(err.value)
    assert repr(str(path)) in message
    assert "is not a CIFAR python batch file" in message
    assert f"extract it again from {archive}" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__ is False
    assert err.value.__context__ is None  # no pickle traceback chained underneath
    return message


def test_batch_of_random_bytes_is_named(cifar10_dir: Path) -> None:
    bad = cifar10_dir / "data_batch_4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    _not_a_batch(err, bad, "cifar-10-python.tar.gz")


@pytest.mark.parametrize("keep", [0, 1000])
def test_truncated_batch_is_named(cifar10_dir: Path, keep: int) -> None:
    bad = cifar10_dir / "test_batch"
    bad.write_bytes(bad.read_bytes()[:keep])
    with pytest.raises(ValueError) as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    message = _not_a_batch(err, bad, "cifar-10-python.tar.gz")
    assert f"empty or truncated at {keep} bytes" in message


def test_bad_meta_file_is_named(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path / "cifar-100-python")
    bad = folder / "meta"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError) as err:
        CIFAR100DataModule(str(tmp_path)).setup("fit")
    _not_a_batch(err, bad, "cifar-100-python.tar.gz")


def test_batch_of_another_type_is_named(cifar10_dir: Path) -> None:
    bad = cifar10_dir / "data_batch_1"
    bad.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError) as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    assert "holds a list, not a dict" in _not_a_batch(err, bad, "cifar-10-python.tar.gz")


def test_label_out_of_range_names_the_file(cifar10_dir: Path) -> None:
    labels = [3] * 20
    labels[7] = 10
    dump_pickle(cifar10_dir / "data_batch_5", {b"labels": labels, b"data": images(20)})
    with pytest.raises(ValueError) as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    message = str(err.value)
    assert repr(str(cifar10_dir / "data_batch_5")) in message
    assert "label 10 at index 7, outside [0, 10)" in message


def test_images_and_labels_of_a_batch_must_match(cifar10_dir: Path) -> None:
    dump_pickle(cifar10_dir / "data_batch_1", {b"labels": [0] * 19, b"data": images(20)})
    with pytest.raises(ValueError, match="holds 20 images but 19 labels") as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    assert repr(str(cifar10_dir / "data_batch_1")) in str(err.value)


def test_empty_test_batch_names_the_split(cifar10_dir: Path) -> None:
    empty = {b"labels": [], b"data": np.zeros((0, 3072), dtype=np.uint8)}
    dump_pickle(cifar10_dir / "test_batch", empty)
    with pytest.raises(ValueError, match="the test split of CIFAR10DataModule is empty") as err:
        CIFAR10DataModule(str(cifar10_dir)).setup("fit")
    assert "test_batch" in str(err.value) and "num_samples" not in str(err.value)


def _cifar_n_error(cifar10_dir: Path, path: Path) -> ValueError:
    dm = CIFAR10DataModule(
        str(cifar10_dir), noisy_labels_file=str(path), noisy_label_key="aggre_label"
    )
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert repr(str(path)) in message and "is not a CIFAR-N label file" in message
    assert "UCSC-REAL/cifar-10-100n" in message  # where to get the file again
    assert "weights_only" not in message  # never torch's advice to load it unsafely
    assert err.value.__context__ is None and err.value.__cause__ is None
    return err.value


def test_cifar_n_file_of_random_bytes(cifar10_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "CIFAR-10_human.pt"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    _cifar_n_error(cifar10_dir, path)


def test_cifar_n_file_truncated(cifar10_dir: Path, cifar_n_file) -> None:
    path, _ = cifar_n_file
    path.write_bytes(path.read_bytes()[:300])
    _cifar_n_error(cifar10_dir, path)


def test_cifar_n_file_with_foreign_objects(cifar10_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"aggre_label": train_labels_10(), "x": _RunsCode()}, path)
    error = _cifar_n_error(cifar10_dir, path)
    assert "Unsupported global: GLOBAL print" in str(error)  # torch's reason, not its advice
    assert "code from the file ran" not in capsys.readouterr().out


class _RunsCode:
    """Unpickling this calls ``print``: a stand-in for code hidden in a file."""

    def __reduce__(self):
        return (print, ("code from the file ran",))


# ------------------------------------------------------------------------------ CIFAR-N
def test_cifar_n_file_loads_with_weights_only(cifar_n_file) -> None:
    path, labels = cifar_n_file
    loaded = load_cifar_n_labels(path)
    assert set(loaded) == set(labels)
    for key, value in labels.items():
        assert torch.equal(loaded[key], torch.as_tensor(value))


def test_cifar_n_file_from_numpy_1_loads(tmp_path: Path, cifar_n_file) -> None:
    """The official files were written under numpy 1.x, whose arrays pickle as numpy.core.*."""
    _, labels = cifar_n_file
    legacy = tmp_path / "legacy.pt"
    torch.save(labels, legacy, _use_new_zipfile_serialization=False)
    content = legacy.read_bytes()
    assert b"numpy._core.multiarray\n" in content  # GLOBAL opcode text of numpy 2
    legacy.write_bytes(content.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    loaded = load_cifar_n_labels(legacy)
    assert torch.equal(loaded["worse_label"], torch.as_tensor(labels["worse_label"]))


def test_cifar_n_labels_are_used(cifar10_dir: Path, cifar_n_file) -> None:
    path, labels = cifar_n_file
    dm = CIFAR10DataModule(
        str(cifar10_dir), noisy_labels_file=str(path), noisy_label_key="aggre_label"
    )
    assert dm.noise == LabelNoise("given")
    ds = dm.train_dataset
    assert torch.equal(ds.noisy_targets, torch.as_tensor(labels["aggre_label"]))
    expected_mask = torch.as_tensor(labels["aggre_label"] != labels["clean_label"])
    assert torch.equal(dm.noise_mask, expected_mask) and expected_mask.any()
    _, y, i = ds[5]
    assert y == int(labels["aggre_label"][5]) and i == 5


def test_cifar_n_labels_follow_the_validation_split(cifar10_dir: Path, cifar_n_file) -> None:
    path, labels = cifar_n_file
    dm = CIFAR10DataModule(
        str(cifar10_dir),
        noisy_labels_file=str(path),
        noisy_label_key="worse_label",
        val_fraction=0.3,
        noisy_validation=True,
        augment=False,
    )
    worse = torch.as_tensor(labels["worse_label"])
    for dataset, has_index in ((dm.train_dataset, True), (dm.val_dataset, False)):
        for k in range(len(dataset)):
            item = dataset[k]
            original = _pixel_index(item[0], 0.4914, 0.2470)
            assert item[1] == int(worse[original])
            if has_index:
                assert item[2] == k


def test_cifar_n_wrong_key_lists_available_keys(cifar10_dir: Path, cifar_n_file) -> None:
    path, _ = cifar_n_file
    dm = CIFAR10DataModule(str(cifar10_dir), noisy_labels_file=str(path), noisy_label_key="nope")
    with pytest.raises(ValueError, match=r"aggre_label.*clean_label.*random_label1.*worse_label"):
        dm.setup("fit")


def test_cifar_n_wrong_length(cifar10_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    torch.save({"aggre_label": np.zeros(99, dtype=np.int64)}, path)
    dm = CIFAR10DataModule(
        str(cifar10_dir), noisy_labels_file=str(path), noisy_label_key="aggre_label"
    )
    with pytest.raises(ValueError, match="99 labels but the CIFAR-10 training set has 100"):
        dm.setup("fit")


def test_cifar_n_wrong_dataset(cifar10_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    clean = (train_labels_10() + 1) % 10
    torch.save({"aggre_label": clean, "clean_label": clean}, path)
    dm = CIFAR10DataModule(
        str(cifar10_dir), noisy_labels_file=str(path), noisy_label_key="aggre_label"
    )
    with pytest.raises(ValueError, match="wrong file for this dataset"):
        dm.setup("fit")


def test_cifar_n_out_of_range(cifar10_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "c100.pt"
    torch.save({"noisy_label": np.full(N_TRAIN_10, 57)}, path)
    dm = CIFAR10DataModule(
        str(cifar10_dir), noisy_labels_file=str(path), noisy_label_key="noisy_label"
    )
    with pytest.raises(ValueError, match="label 57 at index 0"):
        dm.setup("fit")


def test_cifar100_n_default_key(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")
    clean = np.arange(N_TRAIN_100) % 100
    noisy = np.where(np.arange(N_TRAIN_100) % 3 == 0, (clean + 1) % 100, clean)
    torch.save({"noisy_label": noisy, "clean_label": clean}, tmp_path / "CIFAR-100_human.pt")
    dm = CIFAR100DataModule(str(tmp_path), noisy_labels_file=str(tmp_path / "CIFAR-100_human.pt"))
    assert dm.noisy_label_key == "noisy_label"
    assert torch.equal(dm.noisy_targets, torch.as_tensor(noisy))


def test_cifar_n_missing_file(cifar10_dir: Path, tmp_path: Path) -> None:
    dm = CIFAR10DataModule(
        str(cifar10_dir), noisy_labels_file=str(tmp_path / "x.pt"), noisy_label_key="aggre_label"
    )
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10_human\.pt"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {
                "noisy_labels_file": "f.pt",
                "noisy_label_key": "aggre",
                "noise": LabelNoise(rate=0.2),
            },
            r"noise.rate=0.2 asks for synthetic noise on top",
        ),
        (
            {"noisy_labels_file": "f.pt", "noisy_label_key": "aggre", "noise": LabelNoise("pair")},
            "noise.kind='pair' asks for synthetic noise",
        ),
        ({"noisy_labels_file": "f.pt"}, "noisy_label_key is needed.*worse_label"),
        ({"noise": LabelNoise("given")}, "noisy_labels_file"),
        ({"noisy_label_key": "aggre_label"}, "needs noisy_labels_file"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"noisy_validation": True}, "val_fraction > 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule("data", **kwargs)


def test_cifar10_instance_noise_on_raw_pixels(cifar10_dir: Path) -> None:
    kwargs = {"noise": LabelNoise("instance", 0.4), "val_fraction": 0.2, "seed": 1}
    dm = CIFAR10DataModule(str(cifar10_dir), noisy_validation=True, **kwargs)
    assert 0.1 < dm.train_dataset.noise_rate < 0.7
    val_noise = dm.val_dataset.noisy  # the NoisyLabels behind the (input, target) view
    assert val_noise.noise.kind == "instance" and val_noise.noise_mask.any()
    assert val_noise.noise.seed != dm.train_dataset.noise.seed  # drawn independently
    plain = CIFAR10DataModule(str(cifar10_dir), augment=False, **kwargs)
    assert torch.equal(plain.noisy_targets, dm.noisy_targets)  # augmentation plays no part
