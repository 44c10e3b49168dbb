"""Synthetic label noise (symmetric, pair, asymmetric, instance-dependent, transition matrix).

:class:`LabelNoise` is the one description of the noise (kind, rate, seed and the options of
each kind), validated once when it is built; :func:`make_noisy_labels`, :class:`NoisyLabels`
and every DataModule take it. The corruption functions are plain functions on label vectors:
each takes a 1-D integer label vector (tensor, numpy array or list) and returns a *new* int64
tensor, and each is deterministic given ``seed``. Randomness comes from a local
``torch.Generator`` only, so the global RNG state is neither read nor changed.
:class:`NoisyLabels` is the thin dataset adapter that applies one of them (or human labels such
as CIFAR-N) to a map-style dataset and yields ``(input, noisy_target, index)``.

Conventions follow the papers and the reference code that the benchmark tables come from:

* symmetric noise (Van Rooyen et al. 2015; Patrini et al. 2017): by default a flipped label goes
  to a uniformly chosen *other* class, so the realised rate equals ``rate``. This is also what
  the Co-teaching code (``noisify_multiclass_symmetric``) and the Late Stopping code do. The
  ELR and DivideMix code instead redraw the label uniformly over *all* classes
  (``randint(num_classes)``), so the realised rate is ``rate * (C - 1) / C``; pass
  ``include_true_class=True`` for that convention.
* pair noise (Han et al. 2018, Co-teaching): class ``c`` flips to ``(c + 1) mod C``.
* asymmetric noise (Patrini et al. 2017, "Making deep neural networks robust to label noise: a
  loss correction approach"): the CIFAR-10 map truck->automobile, bird->airplane, deer->horse,
  cat<->dog.
* instance-dependent noise (Xia et al. 2020, "Part-dependent label noise: towards
  instance-dependent label noise", NeurIPS): the generator released with that paper and reused
  by most later instance-dependent-noise work.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightning_noise._validate import check_choice, check_int, check_number, is_int

__all__ = [
    "CIFAR10_ASYMMETRIC_MAP",
    "NOISE_TYPES",
    "LabelNoise",
    "NoiseKind",
    "NoisyLabels",
    "asymmetric_noise",
    "instance_dependent_noise",
    "make_noisy_labels",
    "noise_transition_matrix",
    "pair_noise",
    "realised_noise_rate",
    "symmetric_noise",
    "transition_matrix_noise",
]

#: The kinds of :class:`LabelNoise`. ``"given"`` means the noisy labels are supplied by the
#: caller (e.g. the human CIFAR-N labels) instead of generated.
NoiseKind = Literal["symmetric", "pair", "asymmetric", "instance", "transition", "given"]
NOISE_TYPES: tuple[str, ...] = get_args(NoiseKind)

#: CIFAR-10 class-dependent flips of Patrini et al. (2017): truck->automobile, bird->airplane,
#: deer->horse, cat<->dog. Classes 0 (airplane), 1 (automobile), 6 (frog), 7 (horse) and
#: 8 (ship) are never corrupted.
CIFAR10_ASYMMETRIC_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

LabelsLike = Tensor | np.ndarray | Sequence[int]

# Row sums of a transition matrix may differ from 1 by this much (float32 round-off).
_ROW_SUM_ATOL = 1e-6


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _as_label_vector(labels: Any, *, name: str = "labels") -> Tensor:
    """Return ``labels`` as a new 1-D int64 CPU tensor, or raise ``ValueError``."""
    if isinstance(labels, Tensor):
        t = labels.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{name} must be a 1-D integer vector (tensor, numpy array or list), got "
                f"{type(labels).__name__} that cannot be converted: {err}"
            ) from err
    if t.numel() == 0:
        # ``np.asarray([])`` is float64: an empty vector is fine whatever its dtype.
        return torch.zeros(0, dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D vector of class indices, got shape {tuple(t.shape)}; "
            "flatten it or pass one label per sample"
        )
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(
            f"{name} must hold integer class indices, got dtype {t.dtype}; "
            "convert with .long() if the values are whole numbers"
        )
    return t.to(torch.int64).clone()


def _check_num_classes(num_classes: Any, labels: Tensor, *, name: str = "labels") -> int:
    """Resolve ``num_classes`` (default ``max + 1``) and check ``labels`` lie in range."""
    if num_classes is None:
        if labels.numel() == 0:
            raise ValueError(
                f"cannot infer num_classes from empty {name}; pass num_classes explicitly"
            )
        num_classes = int(labels.max()) + 1
    num_classes = check_int(
        "num_classes",
        num_classes,
        minimum=2,
        hint="to corrupt labels (a single-class problem has no other class to flip to)",
    )
    _check_label_range(labels, num_classes, name=name)
    return num_classes


def _check_label_range(labels: Tensor, num_classes: int, *, name: str = "labels") -> None:
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        value = int(labels[i])
        raise ValueError(
            f"{name} must lie in [0, num_classes) = [0, {num_classes}), got {value} at "
            f"index {i}; fix the labels or pass a larger num_classes"
        )


def _check_rate(rate: Any) -> float:
    return check_number(
        "rate",
        rate,
        low=0,
        high=1,
        high_open=True,
        hint="(the probability that a label is corrupted: e.g. 0.2 for 20% noise)",
    )


def _generator(seed: Any) -> torch.Generator:
    seed = check_int("seed", seed, minimum=0)
    return torch.Generator(device="cpu").manual_seed(seed)


def _sample_rows(probs: Tensor, gen: torch.Generator) -> Tensor:
    """Draw one class per row of the [N, C] probability matrix ``probs``."""
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    # torch.multinomial never picks a zero-probability class, unlike an inverse-CDF lookup
    # whose cumulative sum may stop short of 1 by round-off.
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


# --------------------------------------------------------------------------------------------
# Corruption functions
# --------------------------------------------------------------------------------------------
def symmetric_noise(
    labels: LabelsLike,
    rate: float,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    include_true_class: bool = False,
) -> Tensor:
    """Symmetric (uniform) label noise (Van Rooyen et al. 2015; Patrini et al. 2017).

    Two conventions exist in the literature and they differ in the realised noise rate:

    * ``include_true_class=False`` (default): each label is flipped with probability ``rate`` to a
      class drawn uniformly from the ``C - 1`` *other* classes. The realised rate is ``rate``
      (transition matrix ``1 - rate`` on the diagonal, ``rate / (C - 1)`` elsewhere).
    * ``include_true_class=True``: with probability ``rate`` the label is redrawn uniformly from
      *all* ``C`` classes, so it may "flip" to itself and the realised rate is
      ``rate * (C - 1) / C`` (e.g. 36% for ``rate=0.4`` on CIFAR-10). This is what the ELR
      and DivideMix code call symmetric noise (``randint(num_classes)``); use it to reproduce
      their tables. The Co-teaching and Late Stopping code exclude the true class, as the
      default does.

    Args:
        labels: 1-D integer class indices (tensor, numpy array or list).
        rate: corruption probability in ``[0, 1)``.
        num_classes: number of classes ``C``; defaults to ``max(labels) + 1``.
        seed: seed of the local generator; the same seed gives the same labels.
        include_true_class: use the "may flip to itself" convention described above.

    Returns:
        A new int64 tensor of noisy labels.

    Example:
        >>> clean = torch.arange(10).repeat(1000)
        >>> noisy = symmetric_noise(clean, 0.4, seed=0)
        >>> round(realised_noise_rate(clean, noisy), 1)
        0.4
        >>> bool((noisy == symmetric_noise(clean, 0.4, seed=0)).all())
        True
    """
    y = _as_label_vector(labels)
    c = _check_num_classes(num_classes, y)
    rate = _check_rate(rate)
    gen = _generator(seed)
    n = y.shape[0]
    # Draw every random number for every sample so sample i's fate depends only on the seed.
    flip = torch.rand(n, generator=gen, dtype=torch.float64) < rate
    if include_true_class:
        new = torch.randint(0, c, (n,), generator=gen)
    else:
        # y + U{1, ..., C-1} mod C is uniform over the other classes.
        new = (y + torch.randint(1, c, (n,), generator=gen)) % c
    return torch.where(flip, new, y)


def pair_noise(
    labels: LabelsLike, rate: float, *, num_classes: int | None = None, seed: int = 0
) -> Tensor:
    """Pair-flip label noise (Han et al. 2018, Co-teaching): ``c -> (c + 1) mod C``.

    Each label is moved to the next class with probability ``rate``, so for ``rate >= 0.5`` the
    wrong class becomes the majority label of each class and the problem is not learnable.

    Args:
        labels: 1-D integer class indices.
        rate: corruption probability in ``[0, 1)``.
        num_classes: number of classes ``C``; defaults to ``max(labels) + 1``.
        seed: seed of the local generator.

    Returns:
        A new int64 tensor of noisy labels.

    Example:
        >>> clean = torch.tensor([0, 1, 2, 3] * 500)
        >>> noisy = pair_noise(clean, 0.45, seed=1)
        >>> bool(((noisy == clean) | (noisy == (clean + 1) % 4)).all())
        True
    """
    y = _as_label_vector(labels)
    c = _check_num_classes(num_classes, y)
    rate = _check_rate(rate)
    gen = _generator(seed)
    flip = torch.rand(y.shape[0], generator=gen, dtype=torch.float64) < rate
    return torch.where(flip, (y + 1) % c, y)


def _class_map_entries(class_map: Any) -> dict[int, int]:
    """``class_map`` as a new ``{source: target}`` dict of non-negative ints, else ``ValueError``.

    Keys may also be strings of digits: a map that went through JSON (saved hyperparameters,
    a config dump) has string keys.
    """
    if not isinstance(class_map, Mapping):
        raise ValueError(
            f"class_map must be a mapping {{source_class: target_class}}, got "
            f"{type(class_map).__name__}"
        )
    out: dict[int, int] = {}
    for key, value in class_map.items():
        src = int(key) if isinstance(key, str) and key.isdecimal() else key
        if not (is_int(src) and is_int(value)) or src < 0 or value < 0:
            raise ValueError(
                f"class_map entries must be non-negative integer class indices, got "
                f"{key!r}: {value!r}"
            )
        out[int(src)] = int(value)
    return out


def _check_class_map(class_map: Any, num_classes: int, *, is_default: bool) -> dict[int, int]:
    out = _class_map_entries(class_map)
    for src, dst in out.items():
        for what, cls in (("key", src), ("value", dst)):
            if cls >= num_classes:
                hint = (
                    "the default class_map is CIFAR10_ASYMMETRIC_MAP, which needs "
                    "num_classes >= 10; pass class_map= for your own classes"
                    if is_default
                    else "fix the map or pass a larger num_classes"
                )
                raise ValueError(
                    f"class_map {what} {cls} (in {src}: {dst}) is outside "
                    f"[0, num_classes) = [0, {num_classes}); {hint}"
                )
    return out


def asymmetric_noise(
    labels: LabelsLike,
    rate: float,
    *,
    class_map: Mapping[int, int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Class-dependent ("asymmetric") label noise (Patrini et al. 2017).

    A label of class ``c`` in ``class_map`` becomes ``class_map[c]`` with probability ``rate``;
    classes not in the map are never corrupted, so the realised rate is ``rate`` times the
    fraction of samples in mapped classes (``rate / 2`` on balanced CIFAR-10).

    Args:
        labels: 1-D integer class indices.
        rate: corruption probability of a mapped class, in ``[0, 1)``.
        class_map: ``{source_class: target_class}``; defaults to :data:`CIFAR10_ASYMMETRIC_MAP`
            (truck->automobile, bird->airplane, deer->horse, cat<->dog), which needs
            ``num_classes >= 10``.
        num_classes: number of classes ``C``; defaults to ``max(labels) + 1``.
        seed: seed of the local generator.

    Returns:
        A new int64 tensor of noisy labels.

    Example:
        >>> clean = torch.arange(10).repeat(100)
        >>> noisy = asymmetric_noise(clean, 0.4, seed=0)
        >>> sorted(set(zip(clean[noisy != clean].tolist(), noisy[noisy != clean].tolist())))
        [(2, 0), (3, 5), (4, 7), (5, 3), (9, 1)]
    """
    y = _as_label_vector(labels)
    c = _check_num_classes(num_classes, y)
    rate = _check_rate(rate)
    is_default = class_map is None
    cmap = _check_class_map(
        CIFAR10_ASYMMETRIC_MAP if is_default else class_map, c, is_default=is_default
    )
    gen = _generator(seed)
    target = torch.arange(c)
    for src, dst in cmap.items():
        target[src] = dst
    flip = torch.rand(y.shape[0], generator=gen, dtype=torch.float64) < rate
    return torch.where(flip, target[y], y)


def _check_transition_matrix(matrix: Any) -> Tensor:
    try:
        t = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"transition matrix must be a numeric C x C array: {err}") from err
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(
            f"transition matrix must be square C x C (row = clean class, column = noisy "
            f"class), got shape {tuple(t.shape)}"
        )
    if t.shape[0] < 2:
        raise ValueError(f"transition matrix must be at least 2 x 2, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        i = int((~torch.isfinite(t)).any(1).nonzero()[0, 0])
        raise ValueError(f"transition matrix row {i} has a non-finite entry: {t[i].tolist()}")
    if bool((t < 0).any()):
        i = int((t < 0).any(1).nonzero()[0, 0])
        raise ValueError(
            f"transition matrix row {i} has a negative entry (min {float(t[i].min()):.6g}); "
            "entries are probabilities P(noisy=j | clean=i) and must be >= 0"
        )
    sums = t.sum(1)
    bad = (sums - 1.0).abs() > _ROW_SUM_ATOL
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"transition matrix rows must sum to 1 (row-stochastic), but row {i} sums to "
            f"{float(sums[i]):.6g}; normalise with matrix / matrix.sum(1, keepdim=True)"
        )
    return t


def transition_matrix_noise(labels: LabelsLike, matrix: Any, *, seed: int = 0) -> Tensor:
    """Class-conditional noise from a given transition matrix (Patrini et al. 2017).

    The noisy label of a sample with clean class ``i`` is drawn from row ``i`` of the
    row-stochastic matrix ``T``, ``T[i, j] = P(noisy = j | clean = i)``. Symmetric, pair and
    asymmetric noise are all special cases.

    Args:
        labels: 1-D integer class indices in ``[0, C)``.
        matrix: ``C x C`` row-stochastic matrix (tensor, numpy array or nested lists); rows must
            be non-negative and sum to 1 within ``1e-6``.
        seed: seed of the local generator.

    Returns:
        A new int64 tensor of noisy labels.

    Example:
        >>> T = [[0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.7]]
        >>> noisy = transition_matrix_noise(torch.tensor([0, 1, 2] * 2000), T, seed=0)
        >>> bool((noisy[1::3] == 1).all())  # row 1 is one-hot: class 1 is never corrupted
        True
    """
    t = _check_transition_matrix(matrix)
    y = _as_label_vector(labels)
    _check_label_range(y, t.shape[0])
    gen = _generator(seed)
    return _sample_rows(t[y], gen)


def _truncated_normal(
    n: int, mean: float, std: float, low: float, high: float, gen: torch.Generator
) -> Tensor:
    """Sample N(mean, std^2) truncated to [low, high] by inverting the normal CDF."""
    if std == 0.0:
        return torch.full((n,), mean, dtype=torch.float64)
    cdf = torch.special.ndtr(torch.tensor([(low - mean) / std, (high - mean) / std]).double())
    u = cdf[0] + (cdf[1] - cdf[0]) * torch.rand(n, generator=gen, dtype=torch.float64)
    return (mean + std * torch.special.ndtri(u)).clamp_(low, high)


def instance_dependent_noise(
    labels: LabelsLike,
    features: Any,
    rate: float,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    tau: float = 0.1,
) -> Tensor:
    """Instance-dependent label noise of Xia et al. (2020), "Part-dependent label noise".

    This is the generator released with that NeurIPS 2020 paper (``get_instance_noisy_label``,
    ``norm_std=0.1``), used as "instance-dependent noise" by most later work:

    1. per-sample flip rate ``q_i ~ N(rate, tau^2)`` truncated to ``[0, 1]``;
    2. a random projection ``W`` of shape ``[C, d, C]`` with ``N(0, 1)`` entries;
    3. for sample ``i`` with flattened, L2-normalised features ``x_i`` and clean label ``y``:
       ``p = x_i @ W[y]``; ``p[y] = -inf``; ``p = q_i * softmax(p)``; ``p[y] = 1 - q_i``;
    4. the noisy label is drawn from ``p``.

    So sample ``i`` keeps its label with probability exactly ``1 - q_i`` and the realised rate
    is close to ``E[q_i]``, which is ``rate`` when ``rate`` is at least ``2 * tau`` from 0 and
    1; nearer the ends the truncation pulls the mean inward (``rate=0.05``, ``tau=0.1`` gives
    about 0.09). ``rate=0`` leaves every label unchanged. Which wrong class a sample gets
    depends on its features. Unlike the reference code we L2-normalise ``x_i`` so the softmax
    temperature does not depend on the pixel scale (0-1 vs 0-255) or the feature dimension.

    Args:
        labels: 1-D integer class indices, length ``N``.
        features: ``[N, ...]`` inputs or embeddings; each row is flattened.
        rate: mean flip rate in ``[0, 1)``.
        num_classes: number of classes ``C``; defaults to ``max(labels) + 1``.
        seed: seed of the local generator.
        tau: standard deviation of the per-sample flip rate (``norm_std`` in the reference
            code); ``0`` gives every sample the flip rate ``rate``.

    Returns:
        A new int64 tensor of noisy labels.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(4000, 3, 4, 4, generator=gen)
        >>> clean = torch.randint(0, 10, (4000,), generator=gen)
        >>> noisy = instance_dependent_noise(clean, x, 0.4, seed=0)
        >>> round(realised_noise_rate(clean, noisy), 1)
        0.4
    """
    y = _as_label_vector(labels)
    c = _check_num_classes(num_classes, y)
    rate = _check_rate(rate)
    tau = check_number("tau", tau, low=0)
    if features is None:
        raise ValueError(
            "instance-dependent noise needs features (one row per label); pass features= "
            "(inputs or embeddings of shape [N, ...])"
        )
    x = features.detach().cpu() if isinstance(features, Tensor) else torch.as_tensor(features)
    n = y.shape[0]
    if x.dim() == 0 or x.shape[0] != n:
        raise ValueError(
            f"features must have one row per label: first dimension {n}, got shape {tuple(x.shape)}"
        )
    x = x.reshape(n, -1).to(torch.float64)
    if x.shape[1] == 0:
        raise ValueError(f"features must have at least one value per sample, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or inf; clean them before generating noise")
    x = torch.nn.functional.normalize(x, dim=1)
    gen = _generator(seed)
    q = (
        _truncated_normal(n, rate, tau, 0.0, 1.0, gen)
        if rate > 0
        else torch.zeros(n, dtype=torch.float64)
    )

    # W[c] is drawn class by class ([d, C] at a time) instead of one [C, d, C] tensor, which
    # would be 250 MB in float64 for CIFAR-100 pixels. Every class gets its W[c], present or
    # not, so the draws do not depend on which classes occur.
    logits = torch.empty(n, c, dtype=torch.float64)
    for cls in range(c):
        w = torch.randn(x.shape[1], c, generator=gen, dtype=torch.float64)
        idx = (y == cls).nonzero().squeeze(1)
        if idx.numel():
            logits[idx] = x[idx] @ w
    rows = torch.arange(n)
    logits[rows, y] = -math.inf
    probs = q.unsqueeze(1) * torch.softmax(logits, dim=1)
    probs[rows, y] = 1.0 - q
    return _sample_rows(probs, gen)


# --------------------------------------------------------------------------------------------
# Measuring noise
# --------------------------------------------------------------------------------------------
def _paired(clean: Any, noisy: Any) -> tuple[Tensor, Tensor]:
    a = _as_label_vector(clean, name="clean")
    b = _as_label_vector(noisy, name="noisy")
    if a.shape != b.shape:
        raise ValueError(
            f"clean and noisy labels must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


def noise_transition_matrix(clean: Any, noisy: Any, num_classes: int | None = None) -> Tensor:
    """Empirical transition matrix ``T[i, j] = P(noisy = j | clean = i)``.

    Args:
        clean: 1-D clean class indices.
        noisy: 1-D noisy class indices, same length.
        num_classes: number of classes ``C``; defaults to ``max(clean, noisy) + 1``.

    Returns:
        A ``C x C`` float64 tensor; each row of a class present in ``clean`` sums to 1, the row
        of an absent class is all zeros.

    Example:
        >>> noise_transition_matrix([0, 0, 1, 1], [0, 1, 1, 1])
        tensor([[0.5000, 0.5000],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    a, b = _paired(clean, noisy)
    if num_classes is None and a.numel():
        num_classes = int(torch.maximum(a.max(), b.max())) + 1
    c = _check_num_classes(num_classes, a, name="clean")
    _check_label_range(b, c, name="noisy")
    counts = torch.bincount(a * c + b, minlength=c * c).reshape(c, c).to(torch.float64)
    totals = counts.sum(1, keepdim=True)
    return counts / totals.clamp_min(1.0)


def realised_noise_rate(clean: Any, noisy: Any) -> float:
    """Fraction of labels where ``noisy != clean`` (``0.0`` for empty input).

    Example:
        >>> realised_noise_rate([0, 1, 2, 3], [0, 1, 0, 0])
        0.5
    """
    a, b = _paired(clean, noisy)
    if a.numel() == 0:
        return 0.0
    return float((a != b).double().mean())


# --------------------------------------------------------------------------------------------
# The noise options, and the dispatcher
# --------------------------------------------------------------------------------------------
# Options that only one kind reads; setting one with another kind is almost always a
# configuration mistake, so it raises instead of being silently ignored.
_OPTION_OWNER = {
    "class_map": "asymmetric",
    "transition_matrix": "transition",
    "include_true_class": "symmetric",
    "tau": "instance",
}

#: The default spread ``tau`` of instance-dependent noise (``norm_std`` of Xia et al.'s code).
_DEFAULT_TAU = 0.1


@dataclass(frozen=True)
class LabelNoise:
    """Which label noise to apply: its kind, rate and seed, and the options of that kind.

    One value holds every noise option, validated once here, so :func:`make_noisy_labels`,
    :class:`NoisyLabels` and every DataModule read the same thing. The default,
    ``LabelNoise()``, is clean labels (symmetric noise at rate 0). In a LightningCLI config it
    is a nested mapping, ``noise: {kind: pair, rate: 0.45}``, or ``--data.noise.rate=0.4`` on
    the command line.

    Args:
        kind: one of :data:`NOISE_TYPES`: ``"symmetric"``, ``"pair"``, ``"asymmetric"``,
            ``"instance"``, ``"transition"``, or ``"given"`` (the noisy labels are supplied by
            the data, e.g. the human CIFAR-N labels).
        rate: corruption probability in ``[0, 1)``; must stay ``0.0`` for ``"transition"``
            (the matrix sets the noise) and ``"given"``.
        seed: seed of the noise generator; the same seed gives the same labels.
        class_map: ``{source: target}`` flips for ``"asymmetric"`` only; ``None`` is the
            dataset's standard map (:data:`CIFAR10_ASYMMETRIC_MAP` outside a DataModule). See
            :func:`asymmetric_noise`.
        transition_matrix: the ``C x C`` row-stochastic matrix ``P(noisy = j | clean = i)``,
            required for (and only for) ``"transition"``; see :func:`transition_matrix_noise`.
        include_true_class: for ``"symmetric"`` only: a corrupted label is redrawn from all
            ``C`` classes, the true one included (the ELR/DivideMix convention; realised rate
            ``rate * (C - 1) / C``). See :func:`symmetric_noise`.
        tau: for ``"instance"`` only: the spread of the per-sample flip rate (``None``: 0.1,
            as in Xia et al.'s code). See :func:`instance_dependent_noise`.

    Raises:
        ValueError: naming the bad value, the allowed values and the fix, e.g. an unknown
            kind, a rate outside ``[0, 1)`` or an option that the kind does not read.

    Example:
        >>> noise = LabelNoise("pair", 0.45, seed=1)
        >>> noise.kind, noise.rate, noise.seed
        ('pair', 0.45, 1)
        >>> try:
        ...     LabelNoise("pair", 0.45, class_map={3: 5})
        ... except ValueError as err:
        ...     print(err)
        class_map only applies to kind='asymmetric', got kind='pair';
        remove class_map or set kind='asymmetric'
    """

    kind: NoiseKind = "symmetric"
    rate: float = 0.0
    seed: int = 0
    class_map: dict[int, int] | None = None
    transition_matrix: list[list[float]] | None = None
    include_true_class: bool = False
    tau: float | None = None

    def __post_init__(self) -> None:
        kind = check_choice("kind", self.kind, NOISE_TYPES, hint="(the kind of label noise)")
        rate = _check_rate(self.rate)
        if kind in ("transition", "given") and rate != 0.0:
            what = "the transition matrix sets" if kind == "transition" else "the given labels are"
            raise ValueError(
                f"rate={self.rate!r} does not apply to kind={kind!r} ({what} the noise); "
                "leave rate at 0.0"
            )
        seed = check_int("seed", self.seed, minimum=0, hint="(the seed of the label noise)")
        if not isinstance(self.include_true_class, bool):
            raise ValueError(
                f"include_true_class must be True or False, got {self.include_true_class!r}"
            )
        options = {
            "class_map": self.class_map,
            "transition_matrix": self.transition_matrix,
            "include_true_class": self.include_true_class or None,
            "tau": self.tau,
        }
        for option, value in options.items():
            owner = _OPTION_OWNER[option]
            if value is not None and owner != kind:
                raise ValueError(
                    f"{option} only applies to kind={owner!r}, got kind={kind!r}; "
                    f"remove {option} or set kind={owner!r}"
                )
        if kind == "transition" and self.transition_matrix is None:
            raise ValueError(
                "kind='transition' needs transition_matrix= (a C x C row-stochastic matrix, "
                "row = clean class, column = noisy class)"
            )
        # Frozen: normalise through object.__setattr__. Plain containers (no tensors), so the
        # value dumps to YAML and loads from a checkpoint with weights_only=True.
        set_field = object.__setattr__
        set_field(self, "kind", kind)
        set_field(self, "rate", rate)
        set_field(self, "seed", seed)
        if self.class_map is not None:
            set_field(self, "class_map", _class_map_entries(self.class_map))
        if self.transition_matrix is not None:
            matrix = _check_transition_matrix(self.transition_matrix)
            set_field(self, "transition_matrix", matrix.tolist())
        if self.tau is not None:
            set_field(self, "tau", check_number("tau", self.tau, low=0))

    def __hash__(self) -> int:
        # The generated hash would fail on the dict and list fields.
        class_map = None if self.class_map is None else tuple(sorted(self.class_map.items()))
        matrix = self.transition_matrix
        matrix = None if matrix is None else tuple(map(tuple, matrix))
        return hash(
            (self.kind, self.rate, self.seed, class_map, matrix, self.include_true_class, self.tau)
        )


def _as_label_noise(noise: Any, *, name: str = "noise") -> LabelNoise:
    """``noise`` as a :class:`LabelNoise`: itself, or built from a mapping of its fields.

    A mapping is what a checkpoint's saved hyperparameters hold. Anything else (e.g. the
    string ``"symmetric"`` of the old keyword arguments) raises a ``TypeError`` showing the
    call to write.

    Example:
        >>> _as_label_noise({"kind": "pair", "rate": 0.2}) == LabelNoise("pair", 0.2)
        True
    """
    if isinstance(noise, LabelNoise):
        return noise
    if isinstance(noise, Mapping):
        fields = LabelNoise.__dataclass_fields__
        unknown = sorted(str(k) for k in noise if k not in fields)
        if unknown:
            raise TypeError(
                f"{name} has unknown option(s) {unknown}; LabelNoise has {list(fields)}"
            )
        return LabelNoise(**noise)
    raise TypeError(
        f"{name} must be a LabelNoise, got {noise!r}; pass e.g. "
        f"{name}=LabelNoise(kind='symmetric', rate=0.4, seed=0) (from lightning_noise.data), "
        f"or in YAML a mapping: {name}: {{kind: symmetric, rate: 0.4}}"
    )


def make_noisy_labels(
    labels: LabelsLike,
    noise: LabelNoise,
    *,
    num_classes: int | None = None,
    features: Any = None,
) -> Tensor:
    """Corrupt ``labels`` with the noise that ``noise`` describes (one entry point for configs).

    Args:
        labels: 1-D integer class indices.
        noise: the kind, rate, seed and options. ``kind="given"`` is not valid here: it means
            the noisy labels already exist (e.g. CIFAR-N), so pass them to :class:`NoisyLabels`
            as ``noisy_targets``.
        num_classes: number of classes; defaults to ``max(labels) + 1`` (the matrix size for
            ``"transition"``).
        features: for ``"instance"`` only (required): one row of inputs or embeddings per label,
            see :func:`instance_dependent_noise`.

    Returns:
        A new int64 tensor of noisy labels.

    Example:
        >>> clean = torch.arange(10).repeat(100)
        >>> noisy = make_noisy_labels(clean, LabelNoise("pair", 0.2, seed=3))
        >>> bool((noisy == pair_noise(clean, 0.2, seed=3)).all())
        True
    """
    noise = _as_label_noise(noise)
    kind = noise.kind
    if kind == "given":
        raise ValueError(
            "kind='given' cannot be generated: it means the noisy labels are supplied, e.g. "
            "the human CIFAR-N labels; use NoisyLabels(dataset, LabelNoise('given'), "
            "noisy_targets=...) or pick one of "
            f"{tuple(t for t in NOISE_TYPES if t != 'given')}"
        )
    if features is not None and kind != "instance":
        raise ValueError(
            f"features only applies to kind='instance', got kind={kind!r}; remove features"
        )
    if kind == "symmetric":
        return symmetric_noise(
            labels,
            noise.rate,
            num_classes=num_classes,
            seed=noise.seed,
            include_true_class=noise.include_true_class,
        )
    if kind == "pair":
        return pair_noise(labels, noise.rate, num_classes=num_classes, seed=noise.seed)
    if kind == "asymmetric":
        return asymmetric_noise(
            labels, noise.rate, class_map=noise.class_map, num_classes=num_classes, seed=noise.seed
        )
    if kind == "instance":
        if features is None:
            raise ValueError("kind='instance' needs features (one row per label); pass features=")
        tau = _DEFAULT_TAU if noise.tau is None else noise.tau
        return instance_dependent_noise(
            labels, features, noise.rate, num_classes=num_classes, seed=noise.seed, tau=tau
        )
    # kind == "transition" (LabelNoise guarantees the matrix)
    matrix = _check_transition_matrix(noise.transition_matrix)
    if num_classes is not None and num_classes != matrix.shape[0]:
        raise ValueError(
            f"num_classes={num_classes} does not match the {matrix.shape[0]} x "
            f"{matrix.shape[0]} transition matrix; drop num_classes or fix the matrix"
        )
    return transition_matrix_noise(labels, matrix, seed=noise.seed)


# --------------------------------------------------------------------------------------------
# Dataset adapter
# --------------------------------------------------------------------------------------------
def _item_target(item: Any, index: int) -> int:
    if not isinstance(item, tuple | list) or len(item) < 2:
        raise ValueError(
            f"dataset item {index} must be an (input, target, ...) tuple, got "
            f"{type(item).__name__}; wrap the dataset so it yields (input, target)"
        )
    target = item[1]
    if isinstance(target, Tensor) and target.numel() == 1:
        target = target.reshape(()).item()
    elif isinstance(target, np.ndarray) and target.size == 1:
        target = target.item()
    try:
        return operator.index(target)
    except TypeError as err:
        raise ValueError(
            f"dataset item {index} target must be an integer class index, got {target!r}"
        ) from err


def _targets_attribute(dataset: Any) -> Tensor | None:
    """Clean targets read from ``dataset.targets``, looking through ``Subset``; else ``None``."""
    if isinstance(dataset, Subset):
        parent = _targets_attribute(dataset.dataset)
        if parent is None:
            return None
        indices = dataset.indices
        idx = indices if isinstance(indices, Tensor) else torch.as_tensor(list(indices))
        return parent[idx.long()]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return _as_label_vector(targets, name="dataset.targets")


def _flat_input(x: Any, index: int) -> Tensor:
    try:
        t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        return t.reshape(-1).to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"instance noise needs numeric inputs to use as features, but dataset item "
            f"{index} has input of type {type(x).__name__}; pass features= explicitly"
        ) from err


class NoisyLabels(Dataset):
    """Dataset wrapper that corrupts the labels of a classification dataset.

    Wraps any map-style dataset whose items are ``(input, target, ...)`` (trailing items are
    dropped) and yields ``(input, noisy_target, index)``, where ``index`` is the position in
    this dataset, stable across epochs (sample-selection and per-sample-loss methods key on
    it). The noisy labels are computed once in ``__init__`` from ``noise.seed``, so every
    worker, rank and restart sees the same labels. (To add only the index, with the labels as
    they are, use :class:`~lightning_noise.data.Indexed`.)

    Clean targets are read, in order of preference, from ``targets=``, from
    ``dataset.targets`` (through any ``torch.utils.data.Subset``), or by iterating the dataset
    once.

    Args:
        dataset: map-style dataset of ``(input, target, ...)`` items.
        noise: the :class:`LabelNoise` to apply. ``kind="given"`` uses ``noisy_targets`` as the
            noisy labels (e.g. the human CIFAR-N labels).
        num_classes: number of classes; defaults to ``max + 1`` of the targets.
        targets: clean targets, if the dataset cannot provide them cheaply.
        noisy_targets: the noisy labels, for ``kind="given"`` only.
        features: for ``kind="instance"``; defaults to the flattened inputs of the dataset.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.randn(1000, 3), torch.arange(10).repeat(100))
        >>> ds = NoisyLabels(base, LabelNoise("symmetric", rate=0.2, seed=0))
        >>> x, y, i = ds[7]
        >>> i, y == int(ds.noisy_targets[7]), round(ds.noise_rate, 1)
        (7, True, 0.2)
    """

    def __init__(
        self,
        dataset: Dataset,
        noise: LabelNoise,
        *,
        num_classes: int | None = None,
        targets: LabelsLike | None = None,
        noisy_targets: LabelsLike | None = None,
        features: Any = None,
    ) -> None:
        super().__init__()
        noise = _as_label_noise(noise)
        kind = noise.kind
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"dataset must be a map-style dataset with __len__ and __getitem__, got "
                f"{type(dataset).__name__}"
            )
        if kind == "given" and noisy_targets is None:
            raise ValueError(
                "kind='given' needs noisy_targets= (one noisy label per sample, e.g. CIFAR-N)"
            )
        if kind != "given" and noisy_targets is not None:
            raise ValueError(
                f"noisy_targets only applies to kind='given', got kind={kind!r}; "
                "set kind='given' or drop noisy_targets"
            )
        if kind != "instance" and features is not None:
            raise ValueError(
                f"features only applies to kind='instance', got kind={kind!r}; remove features"
            )
        self.dataset = dataset
        self.noise = noise
        n = len(dataset)

        need_inputs = kind == "instance" and features is None
        clean: Tensor | None = None
        if targets is not None:
            clean = _as_label_vector(targets, name="targets")
        elif not need_inputs:
            clean = _targets_attribute(dataset)
        if clean is None or need_inputs:
            # One pass over the dataset for the targets and/or the instance-noise features.
            iter_targets, inputs = [], []
            for i in range(n):
                item = dataset[i]
                iter_targets.append(_item_target(item, i))
                if need_inputs:
                    inputs.append(_flat_input(item[0], i))
            if clean is None:
                clean = torch.tensor(iter_targets, dtype=torch.int64)
            if need_inputs:
                if len({t.numel() for t in inputs}) > 1:
                    raise ValueError(
                        "instance noise uses the flattened inputs as features, but the inputs "
                        "have different sizes; pass features= explicitly"
                    )
                features = torch.stack(inputs) if inputs else torch.zeros(0, 1)
        if clean.shape[0] != n:
            raise ValueError(
                f"got {clean.shape[0]} clean targets for a dataset of length {n}; pass "
                "targets= with one label per sample"
            )

        if kind == "given":
            noisy = _as_label_vector(noisy_targets, name="noisy_targets")
            if noisy.shape[0] != n:
                raise ValueError(
                    f"noisy_targets must have one label per sample ({n}), got {noisy.shape[0]}"
                )
            if num_classes is None and n:
                num_classes = int(torch.maximum(clean.max(), noisy.max())) + 1
            self._num_classes = _check_num_classes(num_classes, clean, name="targets")
            _check_label_range(noisy, self._num_classes, name="noisy_targets")
        else:
            if kind == "transition" and num_classes is None:
                num_classes = len(noise.transition_matrix)
            self._num_classes = _check_num_classes(num_classes, clean, name="targets")
            noisy = make_noisy_labels(
                clean, noise, num_classes=self._num_classes, features=features
            )
        self._clean = clean
        self._noisy = noisy

    def __len__(self) -> int:
        return self._clean.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        n = len(self)
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for NoisyLabels of length {n}")
        i %= n  # negative indices resolve to the stable non-negative position
        item = self.dataset[i]
        if not isinstance(item, tuple | list) or len(item) < 1:
            raise ValueError(f"dataset item {i} must be an (input, target, ...) tuple")
        return item[0], int(self._noisy[i]), i

    @property
    def clean_targets(self) -> Tensor:
        """Clean labels, int64 ``[N]``."""
        return self._clean

    @property
    def noisy_targets(self) -> Tensor:
        """Noisy labels served by ``__getitem__``, int64 ``[N]``."""
        return self._noisy

    @property
    def noise_mask(self) -> Tensor:
        """Boolean ``[N]``: ``True`` where the noisy label differs from the clean one."""
        return self._noisy != self._clean

    @property
    def noise_rate(self) -> float:
        """Realised fraction of corrupted labels."""
        return realised_noise_rate(self._clean, self._noisy)

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return self._num_classes

    def transition_matrix(self) -> Tensor:
        """Empirical ``C x C`` matrix ``P(noisy = j | clean = i)``, float64."""
        return noise_transition_matrix(self._clean, self._noisy, self._num_classes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(noise={self.noise!r}, num_classes={self._num_classes}, "
            f"len={len(self)}, realised_rate={self.noise_rate:.4f})"
        )
