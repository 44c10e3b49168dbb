"""Tests for ``lightning_noise.data.noise``: statistical properties, determinism, validation."""

from __future__ import annotations

import dataclasses
import doctest
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_noise.data import noise as noise_module
from lightning_noise.data.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    NOISE_TYPES,
    LabelNoise,
    NoisyLabels,
    asymmetric_noise,
    instance_dependent_noise,
    make_noisy_labels,
    noise_transition_matrix,
    pair_noise,
    realised_noise_rate,
    symmetric_noise,
    transition_matrix_noise,
)

SETTINGS = settings(derandomize=True, max_examples=30, deadline=None)

rates = st.floats(min_value=0.0, max_value=0.95, allow_nan=False)
sizes = st.integers(min_value=2000, max_value=5000)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _labels(n: int, num_classes: int, seed: int = 1234) -> torch.Tensor:
    """Uniform random labels from a local generator (not the code under test)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (n,), generator=gen)


def _binomial_tol(p: float, n: int, sigmas: float = 5.0, slack: float = 0.005) -> float:
    """5-sigma binomial tolerance on an observed proportion, plus a little slack."""
    return sigmas * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)) + slack


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total-variation distance between two histograms."""
    return 0.5 * float((a / a.sum() - b / b.sum()).abs().sum())


# --------------------------------------------------------------------------------------------
# Symmetric noise
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(rate=rates, c=st.integers(2, 50), n=sizes, seed=seeds)
def test_symmetric_realised_rate_matches_requested(rate, c, n, seed):
    clean = _labels(n, c, seed % 1000)
    noisy = symmetric_noise(clean, rate, num_classes=c, seed=seed)
    assert noisy.dtype == torch.int64 and noisy.shape == clean.shape
    assert abs(realised_noise_rate(clean, noisy) - rate) <= _binomial_tol(rate, n)


@SETTINGS
@given(rate=rates, c=st.integers(2, 50), n=sizes, seed=seeds)
def test_symmetric_include_true_class_rate_is_scaled(rate, c, n, seed):
    clean = _labels(n, c, seed % 1000)
    noisy = symmetric_noise(clean, rate, num_classes=c, seed=seed, include_true_class=True)
    expected = rate * (c - 1) / c
    assert abs(realised_noise_rate(clean, noisy) - expected) <= _binomial_tol(expected, n)


def test_symmetric_default_never_flips_to_itself():
    # With two classes and rate 0.99, "flip to a different class" corrupts ~99% of labels,
    # whereas the include-true-class convention corrupts only ~49.5%.
    clean = _labels(20000, 2)
    default = symmetric_noise(clean, 0.99, num_classes=2, seed=0)
    assert realised_noise_rate(clean, default) > 0.98
    with_self = symmetric_noise(clean, 0.99, num_classes=2, seed=0, include_true_class=True)
    assert abs(realised_noise_rate(clean, with_self) - 0.495) < _binomial_tol(0.495, 20000)


@pytest.mark.parametrize("include_true_class", [False, True])
def test_symmetric_flips_spread_uniformly(include_true_class):
    c, n, rate = 5, 50000, 0.5
    clean = _labels(n, c)
    noisy = symmetric_noise(
        clean, rate, num_classes=c, seed=7, include_true_class=include_true_class
    )
    t = noise_transition_matrix(clean, noisy, c)
    counts = torch.bincount(clean, minlength=c)
    if include_true_class:
        expected = torch.full((c, c), rate / c, dtype=torch.float64)
        expected.diagonal().add_(1 - rate)
    else:
        expected = torch.full((c, c), rate / (c - 1), dtype=torch.float64)
        expected.diagonal().fill_(1 - rate)
    for i in range(c):
        for j in range(c):
            p = float(expected[i, j])
            assert abs(float(t[i, j]) - p) <= _binomial_tol(p, int(counts[i]), slack=0.0)
    # Chi-square of the flip destinations of class 0 against uniform over the other classes.
    dest = noisy[(clean == 0) & (noisy != 0)]
    obs = torch.bincount(dest, minlength=c)[1:].double()
    if not include_true_class:
        exp = obs.sum() / (c - 1)
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        assert chi2 < 25.0  # df=3: p < 1e-4 above this


def test_symmetric_rate_zero_is_identity():
    clean = _labels(1000, 7)
    assert torch.equal(symmetric_noise(clean, 0.0, seed=3), clean)


# --------------------------------------------------------------------------------------------
# Pair and asymmetric noise
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(rate=rates, c=st.integers(2, 50), n=sizes, seed=seeds)
def test_pair_noise_only_next_class_and_rate(rate, c, n, seed):
    clean = _labels(n, c, seed % 1000)
    noisy = pair_noise(clean, rate, num_classes=c, seed=seed)
    assert bool(((noisy == clean) | (noisy == (clean + 1) % c)).all())
    assert abs(realised_noise_rate(clean, noisy) - rate) <= _binomial_tol(rate, n)


@SETTINGS
@given(rate=rates, n=sizes, seed=seeds)
def test_asymmetric_default_map_follows_map_and_rate(rate, n, seed):
    clean = _labels(n, 10, seed % 1000)
    noisy = asymmetric_noise(clean, rate, seed=seed)
    changed = noisy != clean
    for src, dst in zip(clean[changed].tolist(), noisy[changed].tolist(), strict=True):
        assert CIFAR10_ASYMMETRIC_MAP[src] == dst
    mapped = torch.isin(clean, torch.tensor(list(CIFAR10_ASYMMETRIC_MAP)))
    assert torch.equal(noisy[~mapped], clean[~mapped])
    m = int(mapped.sum())
    assert abs(realised_noise_rate(clean[mapped], noisy[mapped]) - rate) <= _binomial_tol(rate, m)


@SETTINGS
@given(data=st.data(), rate=rates, seed=seeds)
def test_asymmetric_custom_map(data, rate, seed):
    c = data.draw(st.integers(3, 20), label="num_classes")
    keys = data.draw(st.sets(st.integers(0, c - 1), min_size=1, max_size=c), label="keys")
    cmap = {
        k: data.draw(st.integers(0, c - 1).filter(lambda v, k=k: v != k), label=f"map[{k}]")
        for k in sorted(keys)
    }
    clean = _labels(4000, c, seed % 1000)
    noisy = asymmetric_noise(clean, rate, class_map=cmap, num_classes=c, seed=seed)
    changed = noisy != clean
    for src, dst in zip(clean[changed].tolist(), noisy[changed].tolist(), strict=True):
        assert cmap[src] == dst
    mapped = torch.isin(clean, torch.tensor(sorted(cmap)))
    assert torch.equal(noisy[~mapped], clean[~mapped])
    m = int(mapped.sum())
    if m:
        got = realised_noise_rate(clean[mapped], noisy[mapped])
        assert abs(got - rate) <= _binomial_tol(rate, m)


# --------------------------------------------------------------------------------------------
# Transition-matrix noise
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(c=st.integers(2, 8), seed=seeds, sparsity=st.floats(0.0, 0.6))
def test_transition_noise_matches_matrix(c, seed, sparsity):
    gen = np.random.default_rng(seed)
    m = gen.dirichlet(np.ones(c), size=c)
    m[gen.random((c, c)) < sparsity] = 0.0  # some impossible transitions
    m[np.arange(c), np.arange(c)] += 0.1  # every row keeps some mass
    m /= m.sum(1, keepdims=True)
    n_per_class = 3000
    clean = torch.arange(c).repeat(n_per_class)
    noisy = transition_matrix_noise(clean, m, seed=seed)
    emp = noise_transition_matrix(clean, noisy, c)
    for i in range(c):
        for j in range(c):
            p = float(m[i, j])
            if p == 0.0:
                assert float(emp[i, j]) == 0.0
            else:
                assert abs(float(emp[i, j]) - p) <= _binomial_tol(p, n_per_class)


def test_transition_identity_leaves_labels_unchanged():
    clean = _labels(3000, 6)
    assert torch.equal(transition_matrix_noise(clean, torch.eye(6), seed=5), clean)


def test_transition_matches_symmetric_statistics():
    c, rate = 4, 0.3
    m = torch.full((c, c), rate / (c - 1), dtype=torch.float64)
    m.fill_diagonal_(1 - rate)
    clean = _labels(40000, c)
    noisy = make_noisy_labels(clean, LabelNoise("transition", transition_matrix=m, seed=2))
    assert abs(realised_noise_rate(clean, noisy) - rate) <= _binomial_tol(rate, 40000)


# --------------------------------------------------------------------------------------------
# Instance-dependent noise (Xia et al. 2020)
# --------------------------------------------------------------------------------------------
def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_instance_realised_rate_close_to_requested(rate):
    n = 5000
    clean = _labels(n, 10)
    noisy = instance_dependent_noise(clean, _features(n, 32, 0), rate, seed=0)
    assert noisy.dtype == torch.int64
    # E[q] of N(rate, 0.1^2) truncated to [0, 1] is within 0.006 of rate here.
    assert abs(realised_noise_rate(clean, noisy) - rate) <= _binomial_tol(rate, n) + 0.01


@SETTINGS
@given(rate=rates, c=st.integers(2, 20), n=sizes, seed=seeds)
def test_instance_with_fixed_flip_rate_is_binomial(rate, c, n, seed):
    # tau=0 gives every sample q_i = rate, and the true class is excluded from the softmax,
    # so each label changes with probability exactly `rate`.
    clean = _labels(n, c, seed % 1000)
    x = _features(n, 6, seed % 1000)
    noisy = instance_dependent_noise(clean, x, rate, num_classes=c, seed=seed, tau=0.0)
    assert abs(realised_noise_rate(clean, noisy) - rate) <= _binomial_tol(rate, n)


def test_instance_flip_destinations_depend_on_features():
    # Two groups of class-0 samples, each with one shared feature vector: the destinations of
    # their flips follow two different softmaxes, while symmetric noise gives both the same.
    n, d, c = 3000, 16, 10
    a, b = _features(2, d, 11)
    x = torch.cat([a.expand(n, d), b.expand(n, d)])
    clean = torch.zeros(2 * n, dtype=torch.int64)
    inst = instance_dependent_noise(clean, x, 0.5, num_classes=c, seed=0, tau=0.0)
    sym = symmetric_noise(clean, 0.5, num_classes=c, seed=0)

    def hist(z):
        return torch.bincount(z[z != 0], minlength=c).double()

    assert _tv(hist(inst[:n]), hist(inst[n:])) > 0.15
    assert _tv(hist(sym[:n]), hist(sym[n:])) < 0.1


def test_instance_different_features_give_different_labels():
    clean = _labels(2000, 10)
    one = instance_dependent_noise(clean, _features(2000, 8, 1), 0.4, seed=0)
    two = instance_dependent_noise(clean, _features(2000, 8, 2), 0.4, seed=0)
    assert not torch.equal(one, two)


def test_instance_feature_scale_and_shape_invariance():
    clean = _labels(1000, 5)
    x = _features(1000, 12, 3)
    ref = instance_dependent_noise(clean, x, 0.3, seed=4)
    # Features are flattened and L2-normalised: scale and layout do not matter.
    assert torch.equal(instance_dependent_noise(clean, 255 * x, 0.3, seed=4), ref)
    assert torch.equal(instance_dependent_noise(clean, x.reshape(1000, 3, 4), 0.3, seed=4), ref)
    assert torch.equal(instance_dependent_noise(clean, x.numpy(), 0.3, seed=4), ref)


def test_instance_rate_zero_is_identity():
    clean = _labels(1000, 5)
    assert torch.equal(instance_dependent_noise(clean, _features(1000, 4, 0), 0.0), clean)


# --------------------------------------------------------------------------------------------
# Determinism and RNG hygiene (parametrised over every generated noise type)
# --------------------------------------------------------------------------------------------
def _corrupt(kind: str, seed: int) -> torch.Tensor:
    clean = _labels(3000, 10)
    features = _features(3000, 8, 0) if kind == "instance" else None
    if kind == "transition":
        m = torch.full((10, 10), 0.05)
        m.fill_diagonal_(0.55)
        noise = LabelNoise(kind, seed=seed, transition_matrix=m.tolist())
    else:
        noise = LabelNoise(kind, 0.4, seed=seed)
    return make_noisy_labels(clean, noise, features=features)


GENERATED = [t for t in NOISE_TYPES if t != "given"]


@pytest.mark.parametrize("noise", GENERATED)
def test_deterministic_given_seed(noise):
    assert torch.equal(_corrupt(noise, 0), _corrupt(noise, 0))
    assert not torch.equal(_corrupt(noise, 0), _corrupt(noise, 1))


@pytest.mark.parametrize("noise", GENERATED)
def test_no_global_rng_use(noise):
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002 - the global state is what we check
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()  # noqa: NPY002
    first = _corrupt(noise, 9)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002
    torch.manual_seed(2)
    np.random.seed(2)  # noqa: NPY002
    assert torch.equal(_corrupt(noise, 9), first)


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
def test_accepts_tensor_numpy_list_and_returns_new_tensor(kind):
    clean = _labels(500, 4)
    given_labels = {"tensor": clean, "numpy": clean.numpy(), "list": clean.tolist()}[kind]
    out = symmetric_noise(given_labels, 0.5, seed=0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    assert torch.equal(out, symmetric_noise(clean, 0.5, seed=0))
    before = clean.clone()
    out[:] = 0
    assert torch.equal(clean, before)  # the input is never aliased or modified


# --------------------------------------------------------------------------------------------
# Measuring noise
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(c=st.integers(2, 12), n=st.integers(0, 300), seed=seeds)
def test_noise_transition_matrix_matches_counting(c, n, seed):
    gen = np.random.default_rng(seed)
    clean = gen.integers(0, c, n)
    noisy = gen.integers(0, c, n)
    t = noise_transition_matrix(clean, noisy, c)
    assert t.dtype == torch.float64 and t.shape == (c, c)
    for i in range(c):
        rows = noisy[clean == i]
        for j in range(c):
            expected = float(np.mean(rows == j)) if rows.size else 0.0
            assert float(t[i, j]) == pytest.approx(expected)
    expected_rate = float(np.mean(clean != noisy)) if n else 0.0
    assert realised_noise_rate(clean, noisy) == pytest.approx(expected_rate)


def test_noise_transition_matrix_absent_class_row_is_zero():
    t = noise_transition_matrix([0, 0, 2], [1, 0, 2], num_classes=4)
    assert t[1].sum() == 0 and t[3].sum() == 0
    assert torch.allclose(t[[0, 2]].sum(1), torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# NoisyLabels
# --------------------------------------------------------------------------------------------
class _CountingDataset(Dataset):
    """Items are (input, target, extra); optionally exposes ``.targets``; counts reads."""

    def __init__(self, n: int, num_classes: int, *, with_targets: bool) -> None:
        self.x = _features(n, 3, 0)
        self._y = _labels(n, num_classes)
        if with_targets:
            self.targets = self._y.tolist()
        self.reads = 0

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self._y[i]), "extra"


def test_noisy_labels_items_and_properties():
    base = TensorDataset(_features(1000, 3, 0), _labels(1000, 10))
    ds = NoisyLabels(base, LabelNoise("symmetric", 0.3, seed=4))
    assert len(ds) == 1000 and ds.num_classes == 10
    assert ds.noise == LabelNoise("symmetric", 0.3, seed=4)
    assert torch.equal(ds.clean_targets, base.tensors[1])
    assert torch.equal(ds.noisy_targets, symmetric_noise(base.tensors[1], 0.3, seed=4))
    for i in (0, 17, 999):
        x, y, idx = ds[i]
        assert idx == i and isinstance(y, int) and isinstance(idx, int)
        assert y == int(ds.noisy_targets[i])
        assert torch.equal(x, base.tensors[0][i])
    assert ds[-1][2] == 999
    assert ds[17][1:] == ds[17][1:]  # label and index are stable across reads
    assert torch.equal(ds.noise_mask, ds.noisy_targets != ds.clean_targets)
    assert ds.noise_mask.dtype == torch.bool
    assert ds.noise_rate == pytest.approx(float(ds.noise_mask.double().mean()))
    t = ds.transition_matrix()
    assert t.shape == (10, 10)
    assert torch.allclose(t.sum(1), torch.ones(10, dtype=torch.float64))
    with pytest.raises(IndexError):
        ds[1000]


def test_noisy_labels_through_dataloader():
    base = TensorDataset(_features(64, 3, 0), _labels(64, 4))
    ds = NoisyLabels(base, LabelNoise("pair", 0.5))
    seen = []
    for x, y, idx in DataLoader(ds, batch_size=16, shuffle=True):
        assert x.shape == (len(idx), 3)
        assert torch.equal(y, ds.noisy_targets[idx])
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(64))


def test_noisy_labels_reads_targets_attribute_without_iterating():
    base = _CountingDataset(500, 5, with_targets=True)
    ds = NoisyLabels(base, LabelNoise("symmetric", 0.2))
    assert base.reads == 0
    assert torch.equal(ds.clean_targets, torch.tensor(base.targets))
    x, _, idx = ds[3]  # extra trailing item dropped
    assert idx == 3 and torch.equal(x, base.x[3])


def test_noisy_labels_looks_through_subset():
    base = _CountingDataset(500, 5, with_targets=True)
    indices = [4, 400, 7, 7, 123]
    sub = Subset(Subset(base, list(range(100, 500)) + indices), list(range(400, 405)))
    ds = NoisyLabels(sub, LabelNoise("symmetric", 0.5))
    assert base.reads == 0
    assert ds.clean_targets.tolist() == [base.targets[i] for i in indices]
    _, _, idx = ds[1]
    assert idx == 1


def test_noisy_labels_iterates_when_no_targets():
    base = _CountingDataset(300, 5, with_targets=False)
    ds = NoisyLabels(Subset(base, range(0, 300, 3)), LabelNoise("pair", 0.4))
    assert base.reads == 100
    assert torch.equal(ds.clean_targets, base._y[::3])


def test_noisy_labels_explicit_targets_win():
    base = _CountingDataset(200, 5, with_targets=True)
    explicit = (torch.tensor(base.targets) + 1) % 5
    ds = NoisyLabels(base, LabelNoise("symmetric", 0.2), targets=explicit)
    assert torch.equal(ds.clean_targets, explicit)
    assert base.reads == 0


def test_noisy_labels_given_mode():
    base = TensorDataset(_features(400, 3, 0), _labels(400, 10))
    human = symmetric_noise(base.tensors[1], 0.17, seed=123).numpy()
    ds = NoisyLabels(base, LabelNoise("given"), noisy_targets=human)
    assert torch.equal(ds.noisy_targets, torch.from_numpy(human))
    assert ds.noise_rate == pytest.approx(realised_noise_rate(base.tensors[1], human))
    assert ds[5][1] == int(human[5])
    with pytest.raises(ValueError, match="399"):
        NoisyLabels(base, LabelNoise("given"), noisy_targets=human[:399])
    bad = human.copy()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"got 10 at index 3"):
        NoisyLabels(base, LabelNoise("given"), noisy_targets=bad, num_classes=10)
    with pytest.raises(ValueError, match="noisy_targets"):
        NoisyLabels(base, LabelNoise("given"))
    with pytest.raises(ValueError, match="noisy_targets"):
        NoisyLabels(base, LabelNoise("symmetric"), noisy_targets=human)


def test_noisy_labels_instance_uses_flattened_inputs():
    x = _features(600, 12, 5).reshape(600, 3, 2, 2)
    base = TensorDataset(x, _labels(600, 6))
    ds = NoisyLabels(base, LabelNoise("instance", 0.3, seed=2))
    ref = instance_dependent_noise(base.tensors[1], x.reshape(600, -1), 0.3, seed=2)
    assert torch.equal(ds.noisy_targets, ref)


def test_noisy_labels_other_types_match_functions():
    base = TensorDataset(_features(500, 3, 0), _labels(500, 10))
    y = base.tensors[1]
    asym = NoisyLabels(base, LabelNoise("asymmetric", 0.4, seed=1))
    assert torch.equal(asym.noisy_targets, asymmetric_noise(y, 0.4, seed=1))
    m = torch.eye(10).roll(1, dims=1)
    trans = NoisyLabels(base, LabelNoise("transition", seed=1, transition_matrix=m.tolist()))
    assert torch.equal(trans.noisy_targets, (y + 1) % 10)
    assert trans.noise_rate == 1.0


# --------------------------------------------------------------------------------------------
# LabelNoise: the one description of the noise
# --------------------------------------------------------------------------------------------
def _matrix(c: int = 10) -> list[list[float]]:
    m = torch.full((c, c), 0.05, dtype=torch.float64)
    m.fill_diagonal_(1 - 0.05 * (c - 1))
    return m.tolist()


@pytest.mark.parametrize(
    ("noise", "direct"),
    [
        (LabelNoise("symmetric", 0.4, seed=3), lambda y: symmetric_noise(y, 0.4, seed=3)),
        (
            LabelNoise("symmetric", 0.4, seed=3, include_true_class=True),
            lambda y: symmetric_noise(y, 0.4, seed=3, include_true_class=True),
        ),
        (LabelNoise("pair", 0.45, seed=1), lambda y: pair_noise(y, 0.45, seed=1)),
        (LabelNoise("asymmetric", 0.5, seed=2), lambda y: asymmetric_noise(y, 0.5, seed=2)),
        (
            LabelNoise("asymmetric", 0.5, seed=2, class_map={1: 2, 7: 0}),
            lambda y: asymmetric_noise(y, 0.5, class_map={1: 2, 7: 0}, seed=2),
        ),
        (
            LabelNoise("transition", seed=4, transition_matrix=_matrix()),
            lambda y: transition_matrix_noise(y, _matrix(), seed=4),
        ),
        (
            LabelNoise("instance", 0.3, seed=5),  # tau None: the function's default, 0.1
            lambda y: instance_dependent_noise(y, _features(3000, 8, 0), 0.3, seed=5),
        ),
        (
            LabelNoise("instance", 0.3, seed=5, tau=0.2),
            lambda y: instance_dependent_noise(y, _features(3000, 8, 0), 0.3, seed=5, tau=0.2),
        ),
    ],
    ids=lambda v: v.kind if isinstance(v, LabelNoise) else "",
)
def test_make_noisy_labels_is_the_corruption_function_of_the_kind(noise, direct):
    clean = _labels(3000, 10)
    features = _features(3000, 8, 0) if noise.kind == "instance" else None
    got = make_noisy_labels(clean, noise, features=features)
    assert torch.equal(got, direct(clean))
    assert realised_noise_rate(clean, got) > 0.05  # the options were applied, not dropped


def test_noisy_labels_exact_flips_are_pinned():
    # Exact labels, so that a refactoring cannot change which samples flip: the first noisy
    # positions and the label checksum of 40% symmetric noise, seed 0, on 500 balanced labels
    # (the values of the code before LabelNoise existed).
    base = TensorDataset(_features(500, 3, 0), torch.arange(500) % 10)
    ds = NoisyLabels(base, LabelNoise("symmetric", 0.4))
    assert ds.noise_mask.nonzero().squeeze(1)[:8].tolist() == [6, 7, 9, 11, 12, 17, 20, 22]
    assert (int(ds.noise_mask.sum()), int(ds.noisy_targets.sum())) == (196, 2294)


def test_label_noise_defaults_mean_clean_labels():
    noise = LabelNoise()
    assert (noise.kind, noise.rate, noise.seed) == ("symmetric", 0.0, 0)
    clean = _labels(500, 5)
    assert torch.equal(make_noisy_labels(clean, noise), clean)


def test_label_noise_is_frozen_hashable_and_normalised():
    noise = LabelNoise("asymmetric", 0.3, class_map={"2": 7, np.int64(3): 8})
    assert noise.class_map == {2: 7, 3: 8}  # JSON-style string keys and numpy ints: plain ints
    assert all(type(k) is int and type(v) is int for k, v in noise.class_map.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        noise.rate = 0.5
    same = LabelNoise("asymmetric", 0.3, class_map={3: 8, 2: 7})
    assert noise == same and hash(noise) == hash(same) and len({noise, same}) == 1
    given = {0: 1}
    copied = LabelNoise("asymmetric", class_map=given)
    given[0] = 2
    assert copied.class_map == {0: 1}  # not aliased to the caller's dict
    m = torch.eye(3, dtype=torch.float32).roll(1, dims=1)
    trans = LabelNoise("transition", transition_matrix=m)
    assert trans.transition_matrix == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert type(trans.transition_matrix[0][0]) is float
    assert hash(trans) == hash(LabelNoise("transition", transition_matrix=m.tolist()))
    assert LabelNoise(rate=1 / 4).rate == 0.25 and type(LabelNoise(seed=np.int64(3)).seed) is int


def test_label_noise_round_trips_through_asdict():
    noise = LabelNoise("asymmetric", 0.3, seed=9, class_map={1: 2})
    plain = dataclasses.asdict(noise)
    assert plain == {
        "kind": "asymmetric",
        "rate": 0.3,
        "seed": 9,
        "class_map": {1: 2},
        "transition_matrix": None,
        "include_true_class": False,
        "tau": None,
    }
    assert LabelNoise(**plain) == noise


BAD_NOISE = {
    "unknown kind": (dict(kind="gaussian"), "kind must be one of 'symmetric', 'pair'"),
    "rate 1.0": (dict(rate=1.0), "rate must be in [0, 1), got 1.0"),
    "rate -0.1": (dict(rate=-0.1), "got -0.1"),
    "rate nan": (dict(rate=float("nan")), "got nan"),
    "rate string": (dict(rate="0.4"), "got '0.4'"),
    "rate bool": (dict(rate=True), "got True"),
    "negative seed": (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    "float seed": (dict(seed=1.5), "got 1.5"),
    "rate with transition": (
        dict(kind="transition", rate=0.2, transition_matrix=np.eye(2)),
        "rate=0.2 does not apply to kind='transition' (the transition matrix sets the noise)",
    ),
    "rate with given": (dict(kind="given", rate=0.2), "leave rate at 0.0"),
    "transition without matrix": (dict(kind="transition"), "needs transition_matrix="),
    "matrix with symmetric": (
        dict(rate=0.2, transition_matrix=np.eye(2)),
        "transition_matrix only applies to kind='transition', got kind='symmetric'; "
        "remove transition_matrix or set kind='transition'",
    ),
    "non-stochastic matrix": (
        dict(kind="transition", transition_matrix=[[0.5, 0.5], [0.7, 0.7]]),
        "row 1 sums to 1.4",
    ),
    "class_map with pair": (
        dict(kind="pair", class_map={0: 1}),
        "class_map only applies to kind='asymmetric', got kind='pair'",
    ),
    "class_map not a mapping": (dict(kind="asymmetric", class_map=[0, 1]), "got list"),
    "class_map negative": (dict(kind="asymmetric", class_map={-1: 0}), "-1: 0"),
    "class_map float": (dict(kind="asymmetric", class_map={0: 1.5}), "0: 1.5"),
    "include_true_class with pair": (
        dict(kind="pair", include_true_class=True),
        "include_true_class only applies to kind='symmetric', got kind='pair'",
    ),
    "include_true_class not bool": (dict(include_true_class=1), "True or False, got 1"),
    "tau with symmetric": (dict(tau=0.2), "tau only applies to kind='instance'"),
    "negative tau": (dict(kind="instance", tau=-1.0), "tau must be in [0, inf), got -1.0"),
}


@pytest.mark.parametrize("case", sorted(BAD_NOISE))
def test_label_noise_rejects_bad_values_naming_them(case):
    kwargs, fragment = BAD_NOISE[case]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        LabelNoise(**kwargs)


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_noisy_labels(Y, "symmetric"),
        lambda: NoisyLabels(TensorDataset(torch.zeros(6), torch.tensor(Y)), "pair"),
    ],
)
def test_a_string_for_noise_is_a_type_error_showing_the_fix(call):
    with pytest.raises(TypeError, match=r"noise must be a LabelNoise.*LabelNoise\(kind="):
        call()


# --------------------------------------------------------------------------------------------
# Validation: every bad input raises ValueError naming the bad value
# --------------------------------------------------------------------------------------------
Y = [0, 1, 2, 3, 1, 0]

BAD_INPUTS = {
    "rate 1.0": (lambda: symmetric_noise(Y, 1.0), "got 1.0"),
    "rate -0.1": (lambda: pair_noise(Y, -0.1), "got -0.1"),
    "rate 1.2": (
        lambda: make_noisy_labels(Y, LabelNoise("symmetric", 1.2)),
        "rate must be in [0, 1), got 1.2",
    ),
    "rate nan": (lambda: asymmetric_noise(list(range(10)), float("nan")), "nan"),
    "given not generated": (lambda: make_noisy_labels(Y, LabelNoise("given")), "noisy_targets"),
    "non-stochastic row": (
        lambda: transition_matrix_noise([0, 1], [[0.5, 0.5], [0.7, 0.7]]),
        "row 1 sums to 1.4",
    ),
    "negative entry": (
        lambda: transition_matrix_noise([0, 1], [[1.2, -0.2], [0.0, 1.0]]),
        "row 0 has a negative entry (min -0.2)",
    ),
    "non-square matrix": (lambda: transition_matrix_noise([0, 1], np.ones((2, 3)) / 3), "(2, 3)"),
    "labels beyond matrix": (lambda: transition_matrix_noise([0, 2], np.eye(2)), "got 2"),
    "matrix vs num_classes": (
        lambda: make_noisy_labels(
            Y, LabelNoise("transition", transition_matrix=np.eye(4)), num_classes=5
        ),
        "num_classes=5",
    ),
    "label out of range": (lambda: symmetric_noise([0, 5, 1], 0.2, num_classes=3), "got 5"),
    "negative label": (lambda: pair_noise([0, -1, 1], 0.2), "got -1 at index 1"),
    "num_classes 1": (lambda: symmetric_noise([0, 0, 0], 0.2), "got 1"),
    "num_classes 1 explicit": (lambda: pair_noise([0], 0.2, num_classes=1), "got 1"),
    "2-D labels": (lambda: symmetric_noise([[0, 1], [1, 0]], 0.2), "(2, 2)"),
    "float labels": (lambda: symmetric_noise([0.0, 1.0], 0.2), "float64"),
    "missing features": (lambda: make_noisy_labels(Y, LabelNoise("instance", 0.2)), "features"),
    "features for another kind": (
        lambda: make_noisy_labels(Y, LabelNoise("pair", 0.2), features=torch.ones(6, 2)),
        "features only applies to kind='instance', got kind='pair'",
    ),
    "missing features direct": (lambda: instance_dependent_noise(Y, None, 0.2), "features"),
    "features wrong length": (
        lambda: instance_dependent_noise(Y, torch.zeros(5, 3), 0.2),
        "(5, 3)",
    ),
    "negative tau": (
        lambda: instance_dependent_noise(Y, torch.ones(6, 2), 0.2, tau=-1.0),
        "-1.0",
    ),
    "default map too few classes": (
        lambda: asymmetric_noise([0, 1, 2, 3, 4], 0.2),
        "CIFAR10_ASYMMETRIC_MAP",
    ),
    "map key out of range": (
        lambda: asymmetric_noise(Y, 0.2, class_map={7: 0}),
        "key 7",
    ),
    "map value out of range": (
        lambda: asymmetric_noise(Y, 0.2, class_map={0: 4}),
        "value 4",
    ),
    "negative seed": (lambda: symmetric_noise(Y, 0.2, seed=-3), "-3"),
    "length mismatch": (lambda: realised_noise_rate([0, 1], [0]), "2 and 1"),
    "NoisyLabels targets length": (
        lambda: NoisyLabels(
            TensorDataset(torch.zeros(6), torch.tensor(Y)), LabelNoise(), targets=[0, 1]
        ),
        "got 2 clean targets for a dataset of length 6",
    ),
    "NoisyLabels out-of-range targets": (
        lambda: NoisyLabels(
            TensorDataset(torch.zeros(6), torch.tensor(Y)), LabelNoise(), num_classes=3
        ),
        "got 3 at index 3",
    ),
    "NoisyLabels bad items": (
        lambda: NoisyLabels([torch.zeros(2), torch.zeros(2)], LabelNoise("pair")),
        "(input, target, ...)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_value(case):
    fn, fragment = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        fn()


def test_unknown_kind_error_lists_all_kinds():
    with pytest.raises(ValueError) as err:
        LabelNoise("gaussian", 0.2)
    assert "kind must be one of" in str(err.value) and "'gaussian'" in str(err.value)
    for name in NOISE_TYPES:
        assert repr(name) in str(err.value)


def test_docstring_examples_run():
    result = doctest.testmod(noise_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
