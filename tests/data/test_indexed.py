"""Tests for ``lightning_noise.data.Indexed``: the index added to a user's own dataset."""

from __future__ import annotations

import doctest
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from lightning_noise.data import Indexed, LabelNoise, NoisyLabels
from lightning_noise.data import indexed as indexed_module


class PairList(Dataset):
    """A user's own dataset: items are (input, target) pairs, as lists or tuples."""

    def __init__(self, n: int, *, as_list: bool = False) -> None:
        self.x = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(n))
        self.y = (torch.arange(n) * 7) % 5
        self.as_list = as_list

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        item = (self.x[i], int(self.y[i]))
        return list(item) if self.as_list else item


def test_doctests() -> None:
    assert doctest.testmod(indexed_module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("as_list", [False, True])
def test_each_item_is_the_inner_item_then_its_index(as_list: bool) -> None:
    inner = PairList(23, as_list=as_list)
    ds = Indexed(inner)
    assert len(ds) == 23
    for i in range(23):
        x, y, index = ds[i]
        expected = inner[i]
        assert torch.equal(x, expected[0]) and y == expected[1] and index == i
        assert type(y) is int and type(index) is int
    assert ds[-1][2] == 22 and torch.equal(ds[-1][0], inner[22][0])  # stable position
    with pytest.raises(IndexError, match="out of range"):
        ds[23]
    with pytest.raises(IndexError):
        ds[-24]


def test_item_equals_the_inner_item_followed_by_its_index() -> None:
    pairs = [("a", 3), ("b", 1), ["c", 4]]  # a list of pairs is a map-style dataset
    ds = Indexed(pairs)
    assert [ds[i] for i in range(3)] == [(*pairs[i], i) for i in range(3)]
    assert ds[2] == ("c", 4, 2)


def test_a_tensor_dataset_is_served_unchanged() -> None:
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    ds = Indexed(TensorDataset(x, y))
    got_x, got_y, index = ds[6]
    assert torch.equal(got_x, x[6]) and torch.equal(got_y, y[6]) and index == 6


@pytest.mark.parametrize("num_workers", [0, 2])
def test_inside_a_shuffled_dataloader_batches_carry_the_index(num_workers: int) -> None:
    inner = PairList(50)
    loader = DataLoader(
        Indexed(inner),
        batch_size=8,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for x, y, index in loader:
        assert x.shape == (len(index), 2, 3) and index.dtype == torch.int64
        assert torch.equal(x, inner.x[index]) and torch.equal(y, inner.y[index])
        seen.append(index)
    everything = torch.cat(seen)
    assert torch.equal(everything.sort().values, torch.arange(50))
    assert not torch.equal(everything, torch.arange(50))  # shuffled: the index is what keys


def test_reports_attributes_pass_through_only_when_the_inner_dataset_has_them() -> None:
    base = TensorDataset(torch.randn(40, 3), torch.arange(40) % 4)
    noisy = NoisyLabels(base, LabelNoise("symmetric", 0.5, seed=1))
    wrapped = Indexed(noisy)
    assert wrapped.clean_targets is noisy.clean_targets
    assert torch.equal(wrapped.noise_mask, noisy.noise_mask)
    assert torch.equal(wrapped.noisy_targets, noisy.noisy_targets)
    plain = Indexed(PairList(5))
    for name in ("targets", "clean_targets", "noise_mask", "noisy_targets"):
        assert not hasattr(plain, name)
    with pytest.raises(AttributeError, match="'unrelated'"):
        _ = wrapped.unrelated  # only the listed attributes are forwarded

    class WithTargets(PairList):
        targets = [0, 1, 2]

    assert Indexed(WithTargets(3)).targets == [0, 1, 2]


def test_pickles_for_worker_processes() -> None:
    ds = Indexed(PairList(6))
    again = pickle.loads(pickle.dumps(ds))
    assert len(again) == 6 and again[3][2] == 3 and torch.equal(again[3][0], ds[3][0])


def test_an_iterable_dataset_is_refused_with_the_fix() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.zeros(2), 0) for _ in range(3))

    with pytest.raises(TypeError, match=r"map-style dataset, got the iterable-style Stream.*"):
        Indexed(Stream())
    with pytest.raises(TypeError, match=r"__len__ and __getitem__, got int"):
        Indexed(3)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"image": torch.zeros(2), "label": 1}, r"item 1 is dict with keys \['image', 'label'\]"),
        ((torch.zeros(2), 0, 5), r"item 1 is a 3-tuple, not an \(input, target\) pair"),
        (torch.zeros(2), r"item 1 is Tensor"),
    ],
)
def test_items_that_are_not_pairs_fail_at_first_access(item, match: str) -> None:
    class Odd(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i):
            return (torch.ones(2), 0) if i == 0 else item

    ds = Indexed(Odd())  # nothing is read yet
    assert ds[0][2] == 0
    with pytest.raises(TypeError, match=match) as err:
        ds[1]
    assert "__getitem__(i) returns (x, y)" in str(err.value)


def test_indices_are_positions_of_the_wrapped_set() -> None:
    # Wrapping a Subset numbers its own positions; wrap the full training set instead.
    inner = PairList(10)
    sub = Indexed(Subset(inner, [7, 2, 9]))
    assert [sub[k][2] for k in range(3)] == [0, 1, 2]
    assert sub[1][1] == inner[2][1]
