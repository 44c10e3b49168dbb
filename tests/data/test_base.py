"""Tests for ``lightning_noise.data.base``: splits, noise wiring, samplers and validation."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_noise.data import base as base_module
from lightning_noise.data.base import (
    DataSplits,
    NoisyLabelDataModule,
    TensorImageDataset,
    random_crop_with_padding,
    stratified_split,
)
from lightning_noise.data.noise import LabelNoise, NoisyLabels


class ToyDataModule(NoisyLabelDataModule):
    """A tiny concrete DataModule: 200 4-dim vectors whose first value encodes the index."""

    def __init__(self, n: int = 200, has_val: bool = True, has_test: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.n, self.has_val, self.has_test = n, has_val, has_test
        self.build_calls = 0

    @property
    def num_classes(self) -> int:
        return 5

    @property
    def in_chans(self) -> int:
        return 1

    @property
    def image_size(self) -> None:
        return None

    def _build_splits(self) -> DataSplits:
        self.build_calls += 1
        y = torch.arange(self.n) % 5
        x = torch.arange(self.n, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        tr, va, te = stratified_split(y, 40 if self.has_val else 0, 40, seed=self.seed)

        def ds(idx):
            return TensorImageDataset(x[idx].contiguous(), y[idx])

        return DataSplits(
            train=ds(tr),
            train_targets=y[tr],
            val=ds(va) if self.has_val else None,
            val_targets=y[va] if self.has_val else None,
            test=ds(te) if self.has_test else None,
            test_targets=y[te] if self.has_test else None,
        )


def test_doctests() -> None:
    assert doctest.testmod(base_module, raise_on_error=True).failed == 0


# ------------------------------------------------------------------------------ stratified_split
def test_stratified_split_partitions_and_keeps_proportions() -> None:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 30, 17, 3])])
    tr, va, te = stratified_split(y, 20, 25, seed=3)
    assert (len(tr), len(va), len(te)) == (55, 20, 25)
    assert torch.equal(torch.cat([tr, va, te]).sort().values, torch.arange(100))
    counts = torch.bincount(y, minlength=4).double()
    for split, size in ((va, 20), (te, 25)):
        share = torch.bincount(y[split], minlength=4).double()
        assert ((share - counts * size / 100).abs() < 1.0 + 1e-9).all(), share
        assert torch.equal(split, split.sort().values)


def test_stratified_split_is_deterministic_by_seed() -> None:
    y = torch.arange(300) % 7
    a = stratified_split(y, 30, 30, seed=1)
    b = stratified_split(y, 30, 30, seed=1)
    c = stratified_split(y, 30, 30, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_stratified_split_rejects_empty_train() -> None:
    with pytest.raises(ValueError, match="at least one training sample"):
        stratified_split(torch.arange(10) % 2, 5, 5)


def test_random_crop_with_padding_translates_content() -> None:
    torch.manual_seed(0)
    image = torch.arange(16.0).view(1, 4, 4)
    seen = set()
    for _ in range(50):
        out = random_crop_with_padding(image, 1, fill=-1.0)
        assert out.shape == image.shape
        kept = out[out >= 0]
        assert set(kept.tolist()) <= set(image.flatten().tolist())
        seen.add(tuple(out.flatten().tolist()))
    assert len(seen) > 3  # several offsets were drawn


# ------------------------------------------------------------------------------ noise wiring
def test_train_dataset_is_noisy_labels_with_stable_indices() -> None:
    dm = ToyDataModule(noise=LabelNoise(rate=0.3, seed=4))
    dm.setup("fit")
    ds = dm.train_dataset
    assert isinstance(ds, NoisyLabels)
    assert len(ds) == 120
    for i in (0, 7, 119):
        _, y, idx = ds[i]
        assert idx == i and y == int(ds.noisy_targets[i])
    assert torch.equal(dm.noise_mask, ds.noisy_targets != ds.clean_targets)
    assert torch.equal(dm.clean_targets, ds.clean_targets)
    assert dm.noise_mask.any()
    # validation and test yield (input, clean target)
    assert len(dm.val_dataset[0]) == 2 and len(dm.test_dataset[0]) == 2


def test_setup_is_idempotent() -> None:
    dm = ToyDataModule(noise=LabelNoise(rate=0.3))
    dm.setup("fit")
    first = dm.train_dataset
    dm.setup("fit")
    dm.setup("test")
    dm.setup(None)
    assert dm.build_calls == 1 and dm.train_dataset is first


def test_properties_before_setup_run_setup() -> None:
    dm = ToyDataModule(noise=LabelNoise(rate=0.2))
    assert dm.noise_mask.shape == (120,)
    assert dm.build_calls == 1


def test_recreation_is_deterministic() -> None:
    a = ToyDataModule(noise=LabelNoise(rate=0.4, seed=1), seed=2)
    b = ToyDataModule(noise=LabelNoise(rate=0.4, seed=1), seed=2)
    assert torch.equal(a.train_dataset.noisy_targets, b.train_dataset.noisy_targets)
    c = ToyDataModule(noise=LabelNoise(rate=0.4, seed=2), seed=2)
    assert not torch.equal(a.train_dataset.noisy_targets, c.train_dataset.noisy_targets)


def test_noisy_validation_corrupts_val_but_never_test() -> None:
    dm = ToyDataModule(noise=LabelNoise(rate=0.5), noisy_validation=True)
    val = dm.val_dataset
    clean = torch.arange(200) % 5
    val_x = torch.stack([val[i][0].flatten()[0] for i in range(len(val))]).long()
    val_y = torch.tensor([val[i][1] for i in range(len(val))])
    assert (val_y != clean[val_x]).any()
    test = dm.test_dataset
    test_x = torch.stack([test[i][0].flatten()[0] for i in range(len(test))]).long()
    test_y = torch.tensor([test[i][1] for i in range(len(test))])
    assert torch.equal(test_y, clean[test_x])


def test_without_val_split_validation_uses_test() -> None:
    dm = ToyDataModule(has_val=False)
    assert dm.val_dataset is dm.test_dataset
    dm = ToyDataModule(has_val=False, has_test=False)
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_noisy_validation_without_val_split_raises() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        ToyDataModule(noisy_validation=True, val_fraction=0.0)
    dm = ToyDataModule(noisy_validation=True, has_val=False, val_fraction=None)
    with pytest.raises(ValueError, match="no validation split"):
        dm.setup("fit")


# ------------------------------------------------------------------------------ loaders
def _epoch_order(dm: NoisyLabelDataModule, epoch: int, num_replicas: int = 1, rank: int = 0):
    sampler = dm._train_sampler(num_replicas, rank)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_train_sampler_is_distributed_and_seeded() -> None:
    dm = ToyDataModule(seed=5)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)
    assert loader.sampler.num_replicas == 1 and loader.sampler.seed == 5
    e0, e1 = _epoch_order(dm, 0), _epoch_order(dm, 1)
    assert sorted(e0) == list(range(120)) and e0 != e1
    assert e0 == _epoch_order(ToyDataModule(seed=5), 0)  # same (seed, epoch): same order
    assert e0 != _epoch_order(ToyDataModule(seed=6), 0)


def test_two_ranks_partition_the_training_set() -> None:
    dm = ToyDataModule(n=205)  # 125 training samples: odd, so one index is padded
    for epoch in (0, 3):
        r0, r1 = _epoch_order(dm, epoch, 2, 0), _epoch_order(dm, epoch, 2, 1)
        assert len(r0) == len(r1) == 63
        assert set(r0) | set(r1) == set(range(125))
        assert len(set(r0) & set(r1)) <= 1  # only DistributedSampler's padding repeats


def test_replicas_come_from_the_attached_trainer() -> None:
    dm = ToyDataModule()
    assert dm._replicas() == (1, 0)
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs=None)  # single-device strategy
    assert dm._replicas() == (1, 0)


def test_dataloader_options() -> None:
    dm = ToyDataModule(batch_size=16, drop_last=True)
    train = dm.train_dataloader()
    assert train.batch_size == 16 and train.drop_last and not train.persistent_workers
    assert len(list(train)) == 120 // 16
    val = dm.val_dataloader()
    assert not val.drop_last
    served = torch.cat([x[:, 0, 0, 0] for x, _ in val])  # in dataset order, no shuffling
    assert torch.equal(served, torch.stack([val.dataset[i][0][0, 0, 0] for i in range(40)]))
    assert ToyDataModule(num_workers=1).train_dataloader().persistent_workers


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": LabelNoise("given")}, "noisy_labels_file"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ToyDataModule(**kwargs)


@pytest.mark.parametrize(
    ("noise", "match"),
    [
        ("symmetric", r"noise must be a LabelNoise, got 'symmetric'.*LabelNoise\(kind="),
        ({"kind": "pair", "noise_rate": 0.2}, r"unknown option\(s\) \['noise_rate'\]"),
    ],
)
def test_noise_that_is_not_a_label_noise_raises_type_error(noise, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        ToyDataModule(noise=noise)


def test_noise_options_reach_noisy_labels() -> None:
    dm = ToyDataModule(noise=LabelNoise("asymmetric", 0.9, class_map={0: 1}))
    ds = dm.train_dataset
    flipped = ds.noise_mask
    assert (ds.clean_targets[flipped] == 0).all() and (ds.noisy_targets[flipped] == 1).all()
    matrix = torch.eye(5).roll(1, dims=1).tolist()  # c -> c + 1 always
    dm = ToyDataModule(noise=LabelNoise("transition", transition_matrix=matrix))
    ds = dm.train_dataset
    assert torch.equal(ds.noisy_targets, (ds.clean_targets + 1) % 5)
    assert ds.noise is dm.noise


def test_noise_may_be_a_mapping_and_is_saved_as_a_plain_dict() -> None:
    dm = ToyDataModule(noise={"kind": "pair", "rate": 0.3, "seed": 2})
    assert dm.noise == LabelNoise("pair", 0.3, seed=2)
    # Plain containers in hparams: checkpoints load with weights_only=True.
    assert type(dm.hparams["noise"]) is dict and dm.hparams["noise"]["kind"] == "pair"
    assert dm.hparams_initial["noise"] == dm.hparams["noise"]
    again = ToyDataModule(**{k: dm.hparams[k] for k in ("noise", "seed")})
    assert torch.equal(again.noisy_targets, dm.noisy_targets)


def test_validation_noise_is_drawn_with_another_seed() -> None:
    noise = LabelNoise(rate=0.5, seed=3)
    dm = ToyDataModule(noise=noise, noisy_validation=True)
    val = dm.val_dataset.noisy
    assert val.noise == LabelNoise(rate=0.5, seed=3 + base_module._VAL_NOISE_SEED_OFFSET)
    assert dm.train_dataset.noise == noise
