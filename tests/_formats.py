"""Writers of small files in real dataset formats, shared by the data and CLI tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

N_TRAIN_10 = 100  # 5 batches of 20
N_TRAIN_100 = 200
IMAGE_CLASSES = ("cat", "dog", "fox")


def images(n: int, offset: int = 0) -> np.ndarray:
    """uint8 [n, 3072]; the first pixel of image i is (i + offset) % 256 (traceable images)."""
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = (np.arange(n) + offset) % 256
    return data


def dump_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 pickles


def train_labels_10() -> np.ndarray:
    return np.arange(N_TRAIN_10) % 10


def write_cifar10(folder: Path) -> Path:
    folder.mkdir(parents=True)
    labels = train_labels_10()
    data = images(N_TRAIN_10)
    for b in range(5):
        part = slice(20 * b, 20 * (b + 1))
        dump_pickle(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": labels[part].tolist(),
                b"data": data[part],
                b"filenames": [b"x.png"] * 20,
            },
        )
    dump_pickle(
        folder / "test_batch",
        {b"labels": (np.arange(20) % 10).tolist(), b"data": images(20, offset=100)},
    )
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 20})
    return folder


def write_cifar100(folder: Path) -> Path:
    folder.mkdir(parents=True)
    fine = (np.arange(N_TRAIN_100) % 100).tolist()
    dump_pickle(
        folder / "train",
        {b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": images(200)},
    )
    dump_pickle(
        folder / "test",
        {b"fine_labels": list(range(100)), b"coarse_labels": [0] * 100, b"data": images(100, 7)},
    )
    dump_pickle(
        folder / "meta",
        {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []},
    )
    return folder


def write_images(folder: Path, per_class: int, classes=IMAGE_CLASSES, size=(20, 14)) -> None:
    """``per_class`` PNGs per class; the red value of image k of class c is 10 * c + k."""
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            colour = (10 * c + k, 100, 200)
            Image.new("RGB", size, colour).save(folder / name / f"{k:03d}.png")
