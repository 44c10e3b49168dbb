"""CIFAR-10 / CIFAR-100 DataModules, with synthetic noise or the human CIFAR-N labels.

The data are read from the standard "python version" pickles of
https://www.cs.toronto.edu/~kriz/cifar.html, which the user extracts beforehand: nothing is
ever downloaded. The CIFAR-N human labels (Wei et al. 2022, "Learning with noisy labels
revisited: a study using real-world human annotations", https://github.com/UCSC-REAL/cifar-10-100n)
are read from their ``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` files.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_noise.data._safe_load import safe_torch_load
from lightning_noise.data.base import (
    DataSplits,
    NoisyLabelDataModule,
    TensorImageDataset,
    _split_size,
    random_crop_with_padding,
    random_horizontal_flip,
    stratified_split,
)
from lightning_noise.data.noise import LabelNoise, _as_label_noise

__all__ = [
    "CIFAR100_ASYMMETRIC_MAP",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "load_cifar_n_labels",
]

#: CIFAR-100 asymmetric noise as in the code of Patrini et al. (2017) and the robust-loss papers
#: that reuse it (GCE, SCE, APL, ELR): classes are taken in blocks of 5 consecutive indices
#: (0-4, 5-9, ...) and each flips to the next one in its block, circularly. The default
#: ``class_map`` of :class:`CIFAR100DataModule` for ``kind="asymmetric"``.
CIFAR100_ASYMMETRIC_MAP = {c: (c // 5) * 5 + (c + 1) % 5 for c in range(100)}

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR_N_URL = "https://github.com/UCSC-REAL/cifar-10-100n"


# --------------------------------------------------------------------------------------------
# Reading the pickles
# --------------------------------------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch (a dict of numpy arrays and lists) may reference."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python-3 pickles of bytes at protocol < 3 go through _codecs.encode.
        ("_codecs", "encode"): codecs.encode,
        # ... and an empty bytes object (e.g. of an empty array) through bytes().
        ("__builtin__", "bytes"): bytes,
    }
    # The official files were written with numpy 1.x (numpy.core); numpy 2 writes numpy._core.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    for code in "?bBhHiIlLqQefd":  # numpy >= 1.25 pickles dtypes by their DType class
        dtype_class = type(np.dtype(code))
        allowed[(dtype_class.__module__, dtype_class.__name__)] = dtype_class
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists and dicts only.

    A CIFAR batch is a pickle, and unpickling an arbitrary file can run arbitrary code; this
    refuses every global that a batch of arrays does not need.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays and "
                "lists; is this the python version from " + _CIFAR_URL + "?"
            ) from None


def _not_a_batch(path: Path, archive: str, reason: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} is not a CIFAR python batch file ({reason}); the file is damaged or of "
        f"another format: extract it again from {archive} (the python version from "
        f"{_CIFAR_URL})"
    )


def _load_batch(path: Path, archive: str = "the CIFAR archive") -> dict[bytes, Any]:
    """The dict of one CIFAR python batch; ``ValueError`` naming ``path`` when it is not one."""
    with path.open("rb") as f:
        raw = f.read()
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # random bytes raise about anything; all mean "not a batch"
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if isinstance(err, EOFError) or "truncated" in str(err):
            reason = f"the file is empty or truncated at {len(raw)} bytes ({reason})"
    else:
        if isinstance(batch, dict):
            return batch
        reason = f"it holds a {type(batch).__name__}, not a dict"
    raise _not_a_batch(path, archive, reason)


# --------------------------------------------------------------------------------------------
# CIFAR-N
# --------------------------------------------------------------------------------------------
def _torch_load_safe_globals() -> list[Any]:
    """Globals ``torch.load(weights_only=True)`` needs for a dict of numpy arrays."""
    from numpy import dtypes as _  # noqa: F401  (numpy >= 1.25: the DType classes exist)

    allowed = _numpy_globals()
    out: list[Any] = []
    for (module, name), obj in allowed.items():
        if module in ("_codecs", "__builtin__"):
            continue  # torch's weights-only unpickler handles bytes itself
        own = f"{getattr(obj, '__module__', module)}.{getattr(obj, '__name__', name)}"
        wanted = f"{module}.{name}"
        # (obj, "module.name") lets a numpy-1.x file (numpy.core...) load under numpy 2.
        out.append(obj if own == wanted else (obj, wanted))
    return out


def load_cifar_n_labels(path: str | Path) -> dict[str, Tensor]:
    """Load a CIFAR-N label file (``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt``).

    The official files are ``torch.save``-d dicts of numpy arrays. They are loaded with
    ``weights_only=True`` (no code execution), allowing only numpy's array-rebuilding globals.

    Args:
        path: the ``.pt`` file from https://github.com/UCSC-REAL/cifar-10-100n.

    Returns:
        ``{key: int64 tensor}`` for every array-valued entry (e.g. ``"aggre_label"``,
        ``"worse_label"``, ``"random_label1"``, ``"clean_label"`` for CIFAR-10N;
        ``"noisy_label"``, ``"clean_label"`` for CIFAR-100N).

    Raises:
        FileNotFoundError: when ``path`` does not exist, saying where to get the file.
        ValueError: when the file does not load (random bytes, truncated, a foreign object)
            or is not a dict of label arrays; the message names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-N label file {str(path)!r} not found; download CIFAR-10_human.pt or "
            f"CIFAR-100_human.pt from {_CIFAR_N_URL} (directory data/) and pass its path as "
            "noisy_labels_file"
        )
    fix = f"download CIFAR-10_human.pt or CIFAR-100_human.pt again from {_CIFAR_N_URL}"
    content = safe_torch_load(
        path,
        what="a CIFAR-N label file (a dict of label arrays)",
        fix=fix,
        safe_globals=_torch_load_safe_globals(),
    )
    if not isinstance(content, dict):
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-N label file: it should hold a dict of label arrays, "
            f"got a {type(content).__name__}; {fix}"
        )
    out: dict[str, Tensor] = {}
    for key, value in content.items():
        if isinstance(value, np.ndarray | Tensor | list):
            out[str(key)] = torch.as_tensor(np.asarray(value)).reshape(-1)
    return out


# --------------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------------
class _CifarTransform:
    """uint8 ``[3, 32, 32]`` -> normalised float32, with crop(32, pad 4) + flip when augmenting.

    A module-level class so DataLoader workers can pickle it.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment

    def __call__(self, image: Tensor) -> Tensor:
        x = image.float().div_(255.0)
        if self.augment:
            # Same as torchvision's RandomCrop(32, padding=4) (zero = black padding, before
            # normalisation) followed by RandomHorizontalFlip().
            x = random_horizontal_flip(random_crop_with_padding(x, 4, 0.0))
        return (x - self.mean) / self.std


class _CIFARDataModule(NoisyLabelDataModule):
    """Shared code of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`."""

    _supports_given_noise = True
    _name = ""
    _num_classes = 0
    _folder = ""
    _archive = ""
    _train_files: tuple[str, ...] = ()
    _test_file = ""
    _meta_file = ""
    _label_key = b""
    _names_key = b""
    _mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    _default_noisy_key: str | None = None
    _noisy_keys_hint = ""

    def __init__(
        self,
        data_dir: str,
        *,
        noise: LabelNoise = LabelNoise(),  # noqa: B008 - frozen, so one shared default is safe
        noisy_labels_file: str | None = None,
        noisy_label_key: str | None = None,
        val_fraction: float = 0.0,
        augment: bool = True,
        **kwargs: Any,
    ) -> None:
        noise = _as_label_noise(noise)
        if noisy_labels_file is not None:
            if noise.kind not in ("symmetric", "given"):  # "symmetric" is the untouched default
                raise ValueError(
                    f"noisy_labels_file gives human noisy labels, but noise.kind={noise.kind!r} "
                    "asks for synthetic noise; drop one of them"
                )
            if noise.rate != 0.0:
                raise ValueError(
                    f"noisy_labels_file gives human noisy labels, but noise.rate={noise.rate!r} "
                    "asks for synthetic noise on top; leave noise.rate at 0.0"
                )
            noise = dataclasses.replace(noise, kind="given")
        elif noise.kind == "given":
            raise ValueError(
                f"kind='given' needs noisy_labels_file= (the CIFAR-N file from {_CIFAR_N_URL})"
            )
        elif noisy_label_key is not None:
            raise ValueError(
                f"noisy_label_key={noisy_label_key!r} needs noisy_labels_file= as well"
            )
        super().__init__(noise=noise, val_fraction=val_fraction, augment=augment, **kwargs)
        self.data_dir = str(data_dir)
        self.noisy_labels_file = noisy_labels_file
        self.noisy_label_key = (
            noisy_label_key if noisy_label_key is not None else self._default_noisy_key
        )
        if noisy_labels_file is not None and self.noisy_label_key is None:
            raise ValueError(
                f"noisy_label_key is needed with a {self._name}N file; choose one of "
                f"{self._noisy_keys_hint}"
            )
        #: Class names from the meta file (set by ``setup``; ``None`` if the file is absent).
        self.classes: list[str] | None = None
        self._given: dict[str, Tensor] = {}
        self._features: dict[str, Tensor] = {}

    @property
    def num_classes(self) -> int:
        """10 for CIFAR-10, 100 for CIFAR-100."""
        return self._num_classes

    @property
    def in_chans(self) -> int:
        """3 (RGB)."""
        return 3

    @property
    def image_size(self) -> int:
        """32."""
        return 32

    # ------------------------------------------------------------------ reading
    def _expected_files(self) -> tuple[str, ...]:
        return (*self._train_files, self._test_file)

    def _resolve_root(self) -> Path:
        base = Path(self.data_dir).expanduser()
        candidates = (base, base / self._folder)
        for root in candidates:
            if all((root / name).is_file() for name in self._expected_files()):
                return root
        looked = " or ".join(repr(str(c)) for c in candidates)
        present = [c for c in candidates if c.is_dir()]
        missing = (
            [n for n in self._expected_files() if not (present[-1] / n).is_file()]
            if present
            else list(self._expected_files())
        )
        raise FileNotFoundError(
            f"{self._name} not found in {looked}: expected the extracted python version "
            f"({self._archive} from {_CIFAR_URL}), i.e. the files "
            f"{', '.join(self._expected_files())} (and {self._meta_file}); missing: "
            f"{', '.join(missing)}. Nothing is downloaded: extract it with "
            f"`tar -xzf {self._archive} -C {str(base)!r}`, which creates {self._folder}/"
        )

    def _read(self, root: Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        data, labels = [], []
        for name in names:
            path = root / name
            batch = _load_batch(path, self._archive)
            for key in (b"data", self._label_key):
                if key not in batch:
                    raise ValueError(
                        f"{str(path)!r} has no {key!r} entry (keys: {sorted(batch)}); it is not "
                        f"a {self._name} python batch file: extract it again from "
                        f"{self._archive} ({_CIFAR_URL})"
                    )
            array = np.asarray(batch[b"data"])
            if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != 3 * 32 * 32:
                raise ValueError(
                    f"{str(path)!r}: data must be uint8 [N, 3072], got {array.dtype} of shape "
                    f"{array.shape}; extract the file again from {self._archive}"
                )
            target = torch.as_tensor(np.asarray(batch[self._label_key], dtype=np.int64))
            target = target.reshape(-1)
            if target.shape[0] != array.shape[0]:
                raise ValueError(
                    f"{str(path)!r} holds {array.shape[0]} images but {target.shape[0]} labels; "
                    f"extract the file again from {self._archive}"
                )
            bad = (target < 0) | (target >= self._num_classes)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{str(path)!r} has label {int(target[i])} at index {i}, outside "
                    f"[0, {self._num_classes}) for {self._name}; is this a {self._name} file "
                    f"(from {self._archive})?"
                )
            data.append(torch.from_numpy(array.reshape(-1, 3, 32, 32).copy()))
            labels.append(target)
        return torch.cat(data), torch.cat(labels)

    def _read_given(self, pool_targets: Tensor) -> Tensor:
        assert self.noisy_labels_file is not None and self.noisy_label_key is not None
        path = self.noisy_labels_file
        content = load_cifar_n_labels(path)
        key = self.noisy_label_key
        if key not in content:
            raise ValueError(
                f"noisy_label_key={key!r} is not in {path}; available keys: {sorted(content)}"
            )
        n = pool_targets.shape[0]
        for name in dict.fromkeys((key, "clean_label")):
            if name in content and content[name].shape[0] != n:
                raise ValueError(
                    f"{path}[{name!r}] has {content[name].shape[0]} labels but the {self._name} "
                    f"training set has {n}; this file is not for this training set"
                )
        noisy = content[key]
        if noisy.dtype.is_floating_point or noisy.dtype == torch.bool:
            raise ValueError(f"{path}[{key!r}] must hold integer labels, got {noisy.dtype}")
        noisy = noisy.long()
        bad = (noisy < 0) | (noisy >= self._num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{path}[{key!r}] has label {int(noisy[i])} at index {i}, outside "
                f"[0, {self._num_classes}) for {self._name}; is this the {self._name}N file?"
            )
        if "clean_label" in content:
            differ = content["clean_label"].long() != pool_targets
            if bool(differ.any()):
                raise ValueError(
                    f"{path}['clean_label'] disagrees with the {self._name} training labels at "
                    f"{int(differ.sum())} of {n} positions (first at index "
                    f"{int(differ.nonzero()[0, 0])}): wrong file for this dataset ({self._name} "
                    f"needs the {self._name}N file, CIFAR-10N and CIFAR-100N are not "
                    "interchangeable)"
                )
        return noisy

    def _empty_split_hint(self, split: str) -> str:
        if split == "val":
            return f"val_fraction={self.val_fraction!r} holds out no image; raise it"
        names = self._train_files if split == "train" else (self._test_file,)
        return (
            f"the files {', '.join(names)} in {self.data_dir!r} hold no images; extract them "
            f"again from {self._archive} ({_CIFAR_URL})"
        )

    def _build_splits(self) -> DataSplits:
        root = self._resolve_root()
        images, targets = self._read(root, self._train_files)
        test_images, test_targets = self._read(root, (self._test_file,))
        meta = root / self._meta_file
        if meta.is_file():
            names = _load_batch(meta, self._archive).get(self._names_key)
            if names is not None:
                self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        given = self._read_given(targets) if self.noise.kind == "given" else None

        n_val = _split_size(self.val_fraction or 0.0, targets.shape[0])
        train_idx, val_idx, _ = stratified_split(targets, n_val, 0, seed=self.seed)
        train_tf = _CifarTransform(self._mean, self._std, self.augment)
        eval_tf = _CifarTransform(self._mean, self._std, False)
        test = TensorImageDataset(test_images, test_targets, eval_tf)
        if n_val == 0:  # the whole pool trains (no copy); validation uses the test split
            train_images, train_targets = images, targets
            val = val_targets = None
        else:
            train_images, train_targets = images[train_idx], targets[train_idx]
            val_targets = targets[val_idx]
            val = TensorImageDataset(images[val_idx], val_targets, eval_tf)
            if given is not None:
                self._given["val"] = given[val_idx]
            if self.noise.kind == "instance":
                self._features["val"] = val.images
        if given is not None:
            self._given["train"] = given if n_val == 0 else given[train_idx]
        if self.noise.kind == "instance":
            # The raw pixels, un-augmented. Note: instance noise converts them to float64,
            # about 1.2 GB transiently for the 50,000 CIFAR training images.
            self._features["train"] = train_images
        return DataSplits(
            train=TensorImageDataset(train_images, train_targets, train_tf),
            train_targets=train_targets,
            val=val,
            val_targets=val_targets,
            test=test,
            test_targets=test_targets,
        )

    def _noise_features(self, split: str) -> Tensor | None:
        return self._features.get(split)

    def _given_noisy_targets(self, split: str) -> Tensor:
        return self._given[split]


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 from the extracted python pickles, with synthetic or human (CIFAR-10N) noise.

    ``data_dir`` is the folder holding ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and
    ``batches.meta`` (or its parent, holding ``cifar-10-batches-py/``): extract
    ``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html there. Nothing
    is downloaded.

    Images are normalised with the CIFAR-10 channel means/stds; with ``augment=True`` (the
    default) training images get a random 32x32 crop of the 4-pixel zero-padded image and a
    random horizontal flip. With ``val_fraction=0`` (the default, as in most noisy-label papers)
    the whole training set trains and **validation runs on the test split**; with
    ``val_fraction > 0`` a stratified validation split is held out of the training set.

    Label noise applies to the training split only (and to the held-out validation split with
    ``noisy_validation=True``). For the human CIFAR-10N labels pass ``noisy_labels_file`` (the
    ``CIFAR-10_human.pt`` of https://github.com/UCSC-REAL/cifar-10-100n) and
    ``noisy_label_key``, one of ``"aggre_label"`` (9.0% noise), ``"random_label1"``,
    ``"random_label2"``, ``"random_label3"`` (about 17-18%) or ``"worse_label"`` (40.2%);
    the noise's kind then becomes ``"given"``.

    Args:
        data_dir: the extracted ``cifar-10-batches-py`` folder or its parent.
        val_fraction: fraction of the 50,000 training images held out for validation.
        augment: random crop (padding 4) + horizontal flip on the training split.
        noisy_labels_file: CIFAR-10N ``.pt`` file with human noisy labels.
        noisy_label_key: which labels of that file to train on (required with a file).
        noise: the synthetic :class:`~lightning_noise.data.noise.LabelNoise`; leave it at the
            default with ``noisy_labels_file`` (its kind then becomes ``"given"``).
        **kwargs: the other shared arguments of
            :class:`~lightning_noise.data.base.NoisyLabelDataModule`: ``batch_size``,
            ``num_workers``, ``noisy_validation``, ``seed`` (of the validation split and of the
            shuffling order), ``drop_last``, ``pin_memory``.
    """

    _name = "CIFAR-10"
    _num_classes = 10
    _folder = "cifar-10-batches-py"
    _archive = "cifar-10-python.tar.gz"
    _train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    _test_file = "test_batch"
    _meta_file = "batches.meta"
    _label_key = b"labels"
    _names_key = b"label_names"
    # Per-channel mean / std of the 50,000 training images, pixels in [0, 1].
    _mean = (0.4914, 0.4822, 0.4465)
    _std = (0.2470, 0.2435, 0.2616)
    _noisy_keys_hint = (
        "'aggre_label', 'worse_label', 'random_label1', 'random_label2', 'random_label3'"
    )


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels) from the python pickles, with synthetic or CIFAR-100N noise.

    ``data_dir`` is the folder holding ``train``, ``test`` and ``meta`` (or its parent, holding
    ``cifar-100-python/``): extract ``cifar-100-python.tar.gz`` from
    https://www.cs.toronto.edu/~kriz/cifar.html there. Nothing is downloaded.

    Everything else is as in :class:`CIFAR10DataModule`; for the human CIFAR-100N labels pass
    ``noisy_labels_file`` (``CIFAR-100_human.pt``); ``noisy_label_key`` defaults to
    ``"noisy_label"`` (40.2% noise).

    Args:
        data_dir: the extracted ``cifar-100-python`` folder or its parent.
        val_fraction: fraction of the 50,000 training images held out for validation.
        augment: random crop (padding 4) + horizontal flip on the training split.
        noisy_labels_file: CIFAR-100N ``.pt`` file with human noisy labels.
        noisy_label_key: which labels of that file to train on (default ``"noisy_label"``).
        noise: the synthetic :class:`~lightning_noise.data.noise.LabelNoise`; leave it at the
            default with ``noisy_labels_file``. For ``kind="asymmetric"`` the default
            ``class_map`` is :data:`CIFAR100_ASYMMETRIC_MAP` (circular flips within blocks of 5
            consecutive classes).
        **kwargs: the other shared arguments of
            :class:`~lightning_noise.data.base.NoisyLabelDataModule`: ``batch_size``,
            ``num_workers``, ``noisy_validation``, ``seed``, ``drop_last``, ``pin_memory``.
    """

    _name = "CIFAR-100"
    _num_classes = 100
    _folder = "cifar-100-python"
    _archive = "cifar-100-python.tar.gz"
    _train_files = ("train",)
    _test_file = "test"
    _meta_file = "meta"
    _label_key = b"fine_labels"
    _names_key = b"fine_label_names"
    _mean = (0.5071, 0.4865, 0.4409)
    _std = (0.2673, 0.2564, 0.2762)
    _default_noisy_key = "noisy_label"
    _noisy_keys_hint = "'noisy_label'"
    _default_class_map = CIFAR100_ASYMMETRIC_MAP
