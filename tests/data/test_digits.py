"""Tests for ``DigitsDataModule``: the embedded scikit-learn digits with label noise."""

from __future__ import annotations

import doctest
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_noise.data import digits as digits_module
from lightning_noise.data.digits import DIGITS_ASYMMETRIC_MAP, DigitsDataModule
from lightning_noise.data.noise import LabelNoise, NoisyLabels

N = 1797


def _targets(dataset) -> torch.Tensor:
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def noisy_dm() -> DigitsDataModule:
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4, seed=3), seed=7)
    dm.setup("fit")
    return dm


def test_doctests() -> None:
    assert doctest.testmod(digits_module, raise_on_error=True).failed == 0


def test_properties_available_without_setup() -> None:
    dm = DigitsDataModule(channels=1, image_size=16)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 16)
    assert dm._train is None  # nothing was loaded


def test_split_sizes_add_up_and_are_stratified(noisy_dm: DigitsDataModule) -> None:
    n_train, n_val, n_test = (
        len(noisy_dm.train_dataset),
        len(noisy_dm.val_dataset),
        len(noisy_dm.test_dataset),
    )
    assert n_train + n_val + n_test == N
    assert (n_val, n_test) == (round(0.15 * N), round(0.2 * N))
    counts = torch.bincount(torch.as_tensor(load_digits().target), minlength=10).double()
    for targets, n in (
        (noisy_dm.train_dataset.clean_targets, n_train),
        (_targets(noisy_dm.val_dataset), n_val),
        (_targets(noisy_dm.test_dataset), n_test),
    ):
        per_class = torch.bincount(targets, minlength=10).double()
        assert ((per_class - counts * n / N).abs() <= 1.0).all(), per_class


def test_splits_are_disjoint_images(noisy_dm: DigitsDataModule) -> None:
    def keys(ds) -> set:
        return {tuple(ds[i][0][0].flatten()[::7].tolist()) for i in range(len(ds))}

    train, val, test = (
        keys(noisy_dm.train_dataset),
        keys(noisy_dm.val_dataset),
        keys(noisy_dm.test_dataset),
    )
    # load_digits holds a few exact duplicate images, so allow a handful of coincidences.
    assert len(train & val) + len(train & test) + len(val & test) < 10


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 8), (1, 20)])
def test_shapes(channels: int, size: int) -> None:
    dm = DigitsDataModule(channels=channels, image_size=size)
    x, y, i = dm.train_dataset[0]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert isinstance(y, int) and i == 0
    xv, yv = dm.val_dataset[0]
    assert xv.shape == (channels, size, size) and isinstance(yv, int)
    if channels == 3:
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_train_split_is_standardised(noisy_dm: DigitsDataModule) -> None:
    x = torch.stack([noisy_dm.train_dataset[i][0] for i in range(len(noisy_dm.train_dataset))])
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3
    assert 0.0 < noisy_dm.mean < 1.0 and noisy_dm.std > 0.0


def test_native_pixels_match_sklearn() -> None:
    dm = DigitsDataModule(channels=1, image_size=8, val_fraction=0.0)
    images = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0
    x, _, _ = dm.train_dataset[0]
    raw = x[0] * dm.std + dm.mean
    assert ((images - raw).abs().flatten(1).amax(1) < 1e-5).any()


def test_determinism_by_seed(noisy_dm: DigitsDataModule) -> None:
    same = DigitsDataModule(noise=LabelNoise(rate=0.4, seed=3), seed=7)
    assert torch.equal(same.train_dataset.clean_targets, noisy_dm.train_dataset.clean_targets)
    assert torch.equal(same.train_dataset.noisy_targets, noisy_dm.train_dataset.noisy_targets)
    assert torch.equal(same.train_dataset[5][0], noisy_dm.train_dataset[5][0])
    other_split = DigitsDataModule(noise=LabelNoise(rate=0.4, seed=3), seed=8)
    assert not torch.equal(other_split.train_dataset[5][0], noisy_dm.train_dataset[5][0])
    other_noise = DigitsDataModule(noise=LabelNoise(rate=0.4, seed=4), seed=7)
    assert torch.equal(other_noise.clean_targets, noisy_dm.clean_targets)
    assert not torch.equal(other_noise.noise_mask, noisy_dm.noise_mask)


def test_noise_only_on_train(noisy_dm: DigitsDataModule) -> None:
    ds = noisy_dm.train_dataset
    assert isinstance(ds, NoisyLabels)
    assert abs(ds.noise_rate - 0.4) < 0.05
    assert torch.equal(noisy_dm.noise_mask, ds.noisy_targets != ds.clean_targets)
    clean = DigitsDataModule(seed=7)  # same split, no noise
    assert torch.equal(_targets(noisy_dm.val_dataset), _targets(clean.val_dataset))
    assert torch.equal(_targets(noisy_dm.test_dataset), _targets(clean.test_dataset))
    assert torch.equal(ds.clean_targets, clean.train_dataset.noisy_targets)


def test_the_benchmark_labels_are_pinned() -> None:
    # The digits rows of benchmarks/RESULTS.md train on exactly these labels (40% symmetric,
    # seeds 0): the first flipped positions and checksums of the code before LabelNoise.
    dm = DigitsDataModule(noise=LabelNoise("symmetric", 0.4), image_size=8, channels=1)
    mask = dm.noise_mask
    assert mask.nonzero().squeeze(1)[:8].tolist() == [6, 7, 9, 11, 12, 17, 20, 22]
    assert (int(mask.sum()), int(dm.noisy_targets.sum())) == (471, 5210)


def test_noisy_validation() -> None:
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4), seed=7, noisy_validation=True)
    clean = DigitsDataModule(seed=7)
    val_noisy, val_clean = _targets(dm.val_dataset), _targets(clean.val_dataset)
    assert abs(float((val_noisy != val_clean).double().mean()) - 0.4) < 0.1
    assert torch.equal(_targets(dm.test_dataset), _targets(clean.test_dataset))


def test_asymmetric_default_map_is_the_digits_map() -> None:
    dm = DigitsDataModule(noise=LabelNoise("asymmetric", 0.5))
    assert dm.noise.class_map == DIGITS_ASYMMETRIC_MAP
    assert dm.hparams["noise"]["class_map"] is None  # the given config, not the filled-in map
    ds = dm.train_dataset
    pairs = set(
        zip(
            ds.clean_targets[ds.noise_mask].tolist(),
            ds.noisy_targets[ds.noise_mask].tolist(),
            strict=True,
        )
    )
    assert pairs == set(DIGITS_ASYMMETRIC_MAP.items())


def test_instance_noise_does_not_depend_on_resolution() -> None:
    noise = LabelNoise("instance", 0.3)
    a = DigitsDataModule(noise=noise, image_size=8, channels=1)
    b = DigitsDataModule(noise=noise, image_size=32, augment=True)
    assert 0.2 < a.train_dataset.noise_rate < 0.4
    assert torch.equal(a.noisy_targets, b.noisy_targets)


def test_train_dataloader_yields_indexed_noisy_batches(noisy_dm: DigitsDataModule) -> None:
    ds = noisy_dm.train_dataset
    seen = []
    for x, y, idx in noisy_dm.train_dataloader():
        assert x.shape[1:] == (3, 32, 32)
        assert torch.equal(y, ds.noisy_targets[idx])
        seen.append(idx)
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(len(ds)))
    assert not torch.equal(seen, torch.arange(len(ds)))  # shuffled


def _order(dm: DigitsDataModule, epoch: int) -> list[int]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does every epoch
    return [int(i) for _, _, idx in loader for i in idx]


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    a, b = DigitsDataModule(seed=1, image_size=8), DigitsDataModule(seed=1, image_size=8)
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 2) == _order(b, 2)  # a "resumed" run at epoch 2 sees the same order
    assert _order(a, 0) != _order(a, 1)


def test_two_ranks_partition_the_indices() -> None:
    dm = DigitsDataModule(image_size=8)
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        shards.append(set(_order(dm, 0)))
    n = len(dm.train_dataset)
    assert shards[0] | shards[1] == set(range(n))
    assert len(shards[0] & shards[1]) <= n % 2


def test_augment_changes_train_but_not_eval() -> None:
    dm = DigitsDataModule(augment=True, image_size=16, channels=1)
    torch.manual_seed(0)
    draws = [dm.train_dataset[3][0] for _ in range(10)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(dm.val_dataset[3][0], dm.val_dataset[3][0])
    plain = DigitsDataModule(augment=False, image_size=16, channels=1)
    assert torch.equal(plain.train_dataset[3][0], plain.train_dataset[3][0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": LabelNoise("given")}, "kind='given' needs human noisy labels"),
        ({"channels": 2}, "channels must be one of 1, 3, got 2"),
        ({"channels": True}, "channels must be an integer, got True"),
        ({"image_size": 4}, "image_size must be an integer >= 8, got 4"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\), got -0.1"),
        ({"test_fraction": 1.5}, "test_fraction must be in .* got 1.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum to less than 1"),
        ({"val_fraction": 0.0, "noisy_validation": True}, "val_fraction > 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


class _IndexRecorder(pl.LightningModule):
    """Records the sampler each rank trains with and the indices it sees per epoch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.lin = torch.nn.Linear(64, 10)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def on_train_end(self) -> None:
        s = self.trainer.train_dataloader.sampler
        info = {"type": type(s).__name__, "replicas": s.num_replicas, "seed": s.seed}
        torch.save({"seen": self.seen, **info}, f"{self.out}/rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.ddp
def test_lightning_ddp_keeps_our_sampler(tmp_path: Path) -> None:
    """Under DDP Lightning keeps our ResumableSampler (a DistributedSampler) and calls set_epoch."""
    dm = DigitsDataModule(image_size=8, channels=1, seed=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_IndexRecorder(str(tmp_path)), dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, got in enumerate(ranks):
        assert (got["type"], got["replicas"], got["seed"]) == ("ResumableSampler", 2, 3)
        for epoch in (0, 1):
            expected = dm._train_sampler(2, rank)
            expected.set_epoch(epoch)
            assert got["seen"][epoch] == list(expected)
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]


def test_set_train_indices_serves_only_those_samples() -> None:
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=4)
    dm.set_train_indices(torch.tensor([9, 3, 500, 0, 7]))
    loaded = [i for _, _, index in dm.train_dataloader() for i in index.tolist()]
    assert sorted(loaded) == [0, 3, 7, 9, 500]
    # Labels stay those of the full training split at each index.
    targets = {
        i: t
        for _, y, index in dm.train_dataloader()
        for i, t in zip(index.tolist(), y.tolist(), strict=True)
    }
    assert all(int(targets[i]) == int(dm.noisy_targets[i]) for i in targets)
    assert dm.train_indices.tolist() == [9, 3, 500, 0, 7]
    dm.set_train_indices(None)
    assert len(dm.train_dataloader().dataset) == len(dm.train_dataset)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([0, 5000], r"positions in the training split \[0, 1168\)"),
        ([1, 1], "repeat"),
        (torch.tensor([0.5]), "integers"),
    ],
)
def test_set_train_indices_rejects_bad_indices(indices, match) -> None:
    dm = DigitsDataModule(image_size=8, channels=1)
    with pytest.raises(ValueError, match=match):
        dm.set_train_indices(indices)


def test_checkpoint_holds_the_noise_as_plain_data_and_restores_it(tmp_path: Path) -> None:
    noise = LabelNoise("asymmetric", 0.3, seed=5, class_map={2: 7})
    dm = DigitsDataModule(noise=noise, image_size=8, channels=1, batch_size=200, seed=1)
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_IndexRecorder(str(tmp_path)), dm)
    path = tmp_path / "noise.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)  # no LabelNoise object inside
    assert saved["datamodule_hyper_parameters"]["noise"] == {
        "kind": "asymmetric",
        "rate": 0.3,
        "seed": 5,
        "class_map": {2: 7},
        "transition_matrix": None,
        "include_true_class": False,
        "tau": None,
    }
    restored = DigitsDataModule.load_from_checkpoint(path)
    assert restored.noise == noise and restored.seed == 1 and restored.image_size == 8
    assert torch.equal(restored.noisy_targets, dm.noisy_targets)
