"""The non-finite policy: NonFiniteGuard skips and counts, stops a diverged run; TrainingDynamics
does not record NaN statistics; LabelAudit refuses a report from a broken run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_noise.callbacks import SAM, LabelAudit, NonFiniteGuard
from lightning_noise.data import Indexed
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.mixins import PerSampleLossMixin
from lightning_noise.types import SampleBatch

STEPS_PER_EPOCH = 4


class Net(PerSampleLossMixin, pl.LightningModule):
    """A user's module whose inputs are NaN at the global steps in ``poison``."""

    def __init__(self, poison: set[int] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 3)
        self.poison = poison or set()

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        if self.global_step in self.poison:
            x = x * float("nan")
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        sample_batch = SampleBatch.create(index, y, logits, losses)
        return self.step_outputs(self.reduce_loss(losses, sample_batch), sample_batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(module: Net, callbacks: list, epochs: int = 2, logger: bool = False) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    data = Indexed(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,))))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=32 // STEPS_PER_EPOCH))
    return trainer


class Snapshots(pl.Callback):
    """The weights at the start of every global step."""

    def __init__(self) -> None:
        self.at: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.at[trainer.global_step] = flat.clone()


def finite(module: nn.Module) -> bool:
    return all(bool(p.isfinite().all()) for p in module.parameters())


def test_nan_steps_are_skipped_counted_and_warned_once() -> None:
    unguarded = Net(poison={2, 3})
    fit(unguarded, [])
    assert not finite(unguarded)  # without the policy one NaN step poisons the weights

    guard, snapshots = NonFiniteGuard(max_consecutive=5), Snapshots()
    guarded = Net(poison={2, 3})
    with pytest.warns(UserWarning, match="step 2 is not finite") as record:
        trainer = fit(guarded, [guard, snapshots])
    assert sum("NonFiniteGuard" in str(w.message) for w in record) == 1
    assert finite(guarded)
    assert guard.skipped_steps == 2 and guard.consecutive == 0
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2.0
    # A skipped step changes nothing: the weights before steps 2, 3 and 4 are the same.
    assert torch.equal(snapshots.at[2], snapshots.at[3])
    assert torch.equal(snapshots.at[3], snapshots.at[4])
    assert not torch.equal(snapshots.at[1], snapshots.at[2])


def test_a_diverged_run_stops_with_advice() -> None:
    module = Net(poison=set(range(1, 100)))
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row.*learning rate"):
        fit(module, [NonFiniteGuard(max_consecutive=3)])
    assert finite(module)


def test_sam_skip_is_covered_and_the_guard_must_follow_sam() -> None:
    sam, guard = SAM(rho=0.05), NonFiniteGuard()
    module = Net(poison={1})
    with pytest.warns(UserWarning, match="not finite"):
        fit(module, [sam, guard])
    assert sam.skipped_steps == 1 and guard.skipped_steps == 1
    assert finite(module)
    with pytest.raises(RuntimeError, match="list SAM before NonFiniteGuard"):
        fit(Net(), [NonFiniteGuard(), SAM(rho=0.05)])


def test_dynamics_do_not_record_nan_and_the_audit_refuses(tmp_path) -> None:
    dynamics = TrainingDynamics(k=1)
    with pytest.warns(UserWarning, match="non-finite loss or logits"):
        fit(Net(poison={5}), [NonFiniteGuard(), dynamics])
    assert dynamics.nonfinite_observations == 32 // STEPS_PER_EPOCH
    # Step 5 is epoch 1's second batch: its samples have no epoch-1 record, the others do.
    seen_epoch_1 = dynamics.store.history[:, 1] >= 0
    assert int(seen_epoch_1.sum()) == 32 - 32 // STEPS_PER_EPOCH
    assert bool(torch.isfinite(dynamics.store.last_loss).all())
    assert dynamics.state_dict()["nonfinite_observations"] == dynamics.nonfinite_observations

    audit = LabelAudit(output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="will not write a report"):
        fit(Net(poison={5}), [NonFiniteGuard(), TrainingDynamics(k=1), audit])
    assert not list(tmp_path.glob("label_audit_*.csv"))


def test_bad_max_consecutive() -> None:
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
