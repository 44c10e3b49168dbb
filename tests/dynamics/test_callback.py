"""Tests for the ``TrainingDynamics`` callback: recording, errors, resume, DDP equality.

The DDP test runs this file as a script (``python test_callback.py OUT_DIR``) with
``strategy="ddp"`` on two CPU processes; Lightning relaunches the script for rank 1.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _trainers import make_trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_noise.dynamics import DynamicsStore, TrainingDynamics
from lightning_noise.types import SampleBatch, find_callback

NUM_FEATURES, NUM_CLASSES = 5, 3


class IndexedDataset(Dataset):
    """Fixed random features and labels; yields ``(x, y, index)``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, NUM_FEATURES, generator=gen)
        self.y = torch.randint(NUM_CLASSES, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class IndexedIterable(IterableDataset):
    """The same samples without a length."""

    def __init__(self, n: int) -> None:
        self.data = IndexedDataset(n)

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


class PerSampleModule(pl.LightningModule):
    """A linear classifier whose ``training_step`` returns the per-sample output dict."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self.net(x)
        per_sample_loss = F.cross_entropy(logits, y, reduction="none")
        return {
            "loss": per_sample_loss.mean(),
            "per_sample_loss": per_sample_loss,
            "logits": logits,
            "target": y,
            "index": index,
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PlainModule(PerSampleModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


def expected_from_frozen_model(model: PerSampleModule, data: IndexedDataset):
    """Correctness, margin and loss of a model that does not change: the store's oracle."""
    with torch.no_grad():
        logits = model.net(data.x)
        loss = F.cross_entropy(logits, data.y, reduction="none")
    correct = logits.argmax(1) == data.y
    assigned = logits.gather(1, data.y[:, None]).squeeze(1)
    others = logits.scatter(1, data.y[:, None], float("-inf")).amax(1)
    return correct, (assigned - others).double(), loss


def test_records_every_sample_each_epoch_against_a_frozen_model(tmp_path):
    data = IndexedDataset(21)
    pl.seed_everything(0)
    model = PerSampleModule(lr=0.0)  # frozen: logits are the same in every epoch
    callback = TrainingDynamics(k=2)
    trainer = make_trainer(tmp_path, [callback], max_epochs=3)
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True))

    correct, margin, loss = expected_from_frozen_model(model, data)
    store = callback.store
    assert store.num_samples == 21 and store.num_epochs == 3
    assert store.history.tolist() == [[int(c)] * 3 for c in correct.tolist()]
    assert torch.equal(store.update_count, torch.full((21,), 3))
    assert torch.equal(store.last_epoch, torch.full((21,), 2))
    torch.testing.assert_close(store.last_loss, loss)
    torch.testing.assert_close(store.aum(), margin)
    assert torch.equal(store.forgetting_events(), torch.zeros(21, dtype=torch.long))
    expected_fkl = torch.where(correct, 0, -1)
    assert torch.equal(callback.first_learned_epoch(), expected_fkl)
    assert torch.equal(callback.first_learned_epoch(k=4), torch.full((21,), -1))
    assert torch.equal(callback.learned_mask(), correct)
    assert torch.equal(callback.aum(), store.aum())
    assert 0 < int(correct.sum()) < 21  # the example is not degenerate


def test_training_changes_the_dynamics(tmp_path):
    data = IndexedDataset(40)
    pl.seed_everything(0)
    callback = TrainingDynamics()
    trainer = make_trainer(tmp_path, [callback], max_epochs=6)
    trainer.fit(PerSampleModule(lr=1.0), DataLoader(data, batch_size=8, shuffle=True))
    history = callback.store.history
    assert history.shape == (40, 6)
    assert bool((history >= 0).all())
    # Learning happens: more samples are correct at the end than at the start.
    assert int((history[:, -1] == 1).sum()) > int((history[:, 0] == 1).sum())
    assert bool(callback.store.last_loss.isfinite().all())
    assert find_callback(trainer, TrainingDynamics) is callback


def test_subset_indexes_the_full_training_set(tmp_path):
    data = IndexedDataset(30)
    kept = [1, 4, 5, 9, 20, 29]
    callback = TrainingDynamics(k=1)
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(PerSampleModule(), DataLoader(Subset(data, kept), batch_size=4))
    store = callback.store
    assert store.num_samples == 30
    assert store.seen.nonzero().flatten().tolist() == kept


def test_explicit_num_samples_with_an_iterable_dataset(tmp_path):
    callback = TrainingDynamics(num_samples=12)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(PerSampleModule(), DataLoader(IndexedIterable(10), batch_size=4))
    assert callback.store.num_samples == 12
    assert callback.store.seen.tolist() == [True] * 10 + [False] * 2


def test_dataset_without_length_needs_num_samples(tmp_path):
    trainer = make_trainer(tmp_path, [TrainingDynamics()], max_epochs=1)
    with pytest.raises(ValueError, match=r"TrainingDynamics\(num_samples=\.\.\.\)"):
        trainer.fit(PerSampleModule(), DataLoader(IndexedIterable(10), batch_size=4))


def test_plain_tensor_training_step_fails_clearly(tmp_path):
    trainer = make_trainer(tmp_path, [TrainingDynamics()], max_epochs=1)
    with pytest.raises(TypeError, match="training_step to return a dict with keys"):
        trainer.fit(PlainModule(), DataLoader(IndexedDataset(8), batch_size=4))


def test_index_outside_the_declared_size_fails_clearly(tmp_path):
    trainer = make_trainer(tmp_path, [TrainingDynamics(num_samples=5)], max_epochs=1)
    with pytest.raises(ValueError, match=r"index \d+ is outside \[0, 5\).*resize"):
        trainer.fit(PerSampleModule(), DataLoader(IndexedDataset(8), batch_size=4))


def test_validation_and_find():
    for k in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            TrainingDynamics(k=k)
    with pytest.raises(ValueError, match="num_samples"):
        TrainingDynamics(num_samples=-3)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert find_callback(trainer, TrainingDynamics) is None
    with pytest.raises(RuntimeError, match=r"callbacks=\[TrainingDynamics\(\)"):
        find_callback(trainer, TrainingDynamics, needed_by="LabelAudit")
    callback = TrainingDynamics()
    assert callback.state_key == "TrainingDynamics"
    assert TrainingDynamics(k=5).state_key == callback.state_key


def test_state_dict_roundtrip_weights_only(tmp_path):
    callback = TrainingDynamics(k=2, num_samples=6)
    batch = {
        "loss": torch.tensor(1.0),
        "per_sample_loss": torch.tensor([0.5, 1.5]),
        "logits": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        "target": torch.tensor([0, 0]),
        "index": torch.tensor([4, 1]),
    }
    callback.store.update(SampleBatch.from_outputs(batch), 3)
    torch.save(callback.state_dict(), tmp_path / "cb.pt")
    restored = TrainingDynamics(k=7)
    restored.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))
    assert restored.k == 2
    assert_states_equal(restored.store.state_dict(), callback.store.state_dict())
    assert restored.store.history[[1, 4], 3].tolist() == [0, 1]


def fit_dynamics(root, max_epochs: int, *, seed: int = 0, ckpt_path=None, save_to=None):
    pl.seed_everything(seed)
    model = PerSampleModule(lr=0.5)
    callback = TrainingDynamics(k=2)
    trainer = make_trainer(root, [callback], max_epochs=max_epochs)
    trainer.fit(model, DataLoader(IndexedDataset(26), batch_size=8), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model, callback


def test_resume_from_checkpoint_is_exact(tmp_path):
    model_straight, straight = fit_dynamics(tmp_path / "a", 4)

    ckpt = tmp_path / "half.ckpt"
    _, half = fit_dynamics(tmp_path / "b", 2, save_to=ckpt)
    half_state = half.store.state_dict()
    # A different seed: the resumed parameters must come from the checkpoint.
    model_resumed, resumed = fit_dynamics(tmp_path / "c", 4, seed=1, ckpt_path=ckpt)

    assert half_state["num_epochs"] == 2 and bool(half.store.seen.all())
    assert_states_equal(resumed.store.state_dict(), straight.store.state_dict())
    assert straight.store.num_epochs == 4
    assert torch.equal(straight.store.update_count, 2 * half.store.update_count)
    assert not torch.equal(straight.store.last_loss, half.store.last_loss)
    for (name, a), b in zip(
        model_straight.state_dict().items(), model_resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype, key
            assert torch.equal(value.nan_to_num(-7.0), b[key].nan_to_num(-7.0)), key
        else:
            assert value == b[key], key


# ------------------------------------------------------------------------------------- DDP
DDP_N, DDP_BATCH, DDP_EPOCHS = 23, 4, 2
# Uneven shards for the frozen run: rank 0 gets 12 samples (batches 4, 4, 4), rank 1 gets 11
# (batches 4, 4, 3), so the last all-gather must pad.
DDP_SHARDS = (list(range(0, 12)), list(range(12, DDP_N)))


def shard_batches(shard: list[int]) -> list[list[int]]:
    return [shard[i : i + DDP_BATCH] for i in range(0, len(shard), DDP_BATCH)]


def ddp_main(out_dir: str) -> None:
    """Entry point of both ranks: two fits, each rank saving its store."""
    warnings.filterwarnings("ignore")
    data = IndexedDataset(DDP_N)
    common = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        max_epochs=DDP_EPOCHS,
    )

    # 1) Frozen model, uneven per-rank batches; compared with one process in the test.
    pl.seed_everything(0)
    callback = TrainingDynamics()
    trainer = pl.Trainer(callbacks=[callback], use_distributed_sampler=False, **common)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    loader = DataLoader(data, batch_sampler=shard_batches(DDP_SHARDS[rank]))
    trainer.fit(PerSampleModule(lr=0.0), loader)
    torch.save(callback.store.state_dict(), Path(out_dir, f"frozen_rank{trainer.global_rank}.pt"))

    # 2) Training with Lightning's DistributedSampler (shuffled, padded to 12 per rank).
    pl.seed_everything(0)
    callback = TrainingDynamics()
    trainer = pl.Trainer(callbacks=[callback], **common)
    trainer.fit(PerSampleModule(lr=0.5), DataLoader(data, batch_size=DDP_BATCH, shuffle=True))
    torch.save(callback.store.state_dict(), Path(out_dir, f"train_rank{trainer.global_rank}.pt"))
    # Rank 0 (the test's subprocess) must not exit before rank 1 has saved; destroying the
    # process group explicitly avoids gloo aborting at interpreter exit.
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_hold_identical_stores_equal_to_one_process(tmp_path):
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)

    def load(name):
        return torch.load(tmp_path / name, weights_only=True)

    # Frozen run: both ranks equal each other and one process that sees, per epoch, the
    # batches in the order the all-gather concatenates them (rank 0's, then rank 1's).
    frozen = [load(f"frozen_rank{r}.pt") for r in (0, 1)]
    assert_states_equal(frozen[0], frozen[1])
    order = [b for pair in zip(*map(shard_batches, DDP_SHARDS), strict=True) for b in pair]
    pl.seed_everything(0)
    callback = TrainingDynamics()
    trainer = make_trainer(tmp_path / "single", [callback], max_epochs=DDP_EPOCHS)
    trainer.fit(PerSampleModule(lr=0.0), DataLoader(IndexedDataset(DDP_N), batch_sampler=order))
    assert_states_equal(frozen[0], callback.store.state_dict())
    assert bool(callback.store.seen.all()) and callback.store.num_epochs == DDP_EPOCHS

    # Training run: ranks agree; every sample is seen each epoch, and the sampler's padding
    # sample twice (24 records per epoch for 23 samples).
    train = [load(f"train_rank{r}.pt") for r in (0, 1)]
    assert_states_equal(train[0], train[1])
    store = DynamicsStore()
    store.load_state_dict(train[0])
    assert bool((store.history >= 0).all()) and store.num_epochs == DDP_EPOCHS
    assert int(store.update_count.sum()) == DDP_EPOCHS * 24


if __name__ == "__main__":
    ddp_main(sys.argv[1])
