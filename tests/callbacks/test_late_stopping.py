"""Tests for Late Stopping (Yuan et al., ICCV 2023).

The references are written here independently of the library: the round targets as the
official scripts compute ``Threshold``, and the FkL counting loop of the official scripts
(``counterright`` / ``list`` / ``lista`` over the per-epoch predictions). The end-to-end tests
train on the embedded digits and check what each round really loads and how it restarts.

The DDP test runs this file as a script (``python test_late_stopping.py OUT_DIR``) with
``strategy="ddp"`` on two CPU processes; Lightning relaunches the script for rank 1.
"""

from __future__ import annotations

import doctest
import sys
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _trainers import ddp_trainer, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

import lightning_noise.callbacks.late_stopping as late_stopping_module
from lightning_noise.callbacks import LateStopping
from lightning_noise.callbacks.late_stopping import fkl_selection, round_schedule
from lightning_noise.data import DigitsDataModule, Indexed, LabelNoise
from lightning_noise.dynamics import DynamicsStore, TrainingDynamics
from lightning_noise.mixins import PerSampleLossMixin
from lightning_noise.models import ImageClassifier
from lightning_noise.types import SampleBatch, find_callback

ROOT = Path(__file__).resolve().parents[2]
# A short schedule for digits: rounds of k = 1 and k = 2, then a 2-epoch final run.
FAST = dict(rate=0.85, rounds_per_k=(1, 1), warmup_epochs=1, final_epochs=2)


def digits(**kwargs: Any) -> DigitsDataModule:
    options: dict[str, Any] = dict(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=100
    )
    options.update(kwargs)
    return DigitsDataModule(**options)


def model() -> ImageClassifier:
    return ImageClassifier("test_resnet", num_classes=10, in_chans=1)


# ----------------------------------------------------------------------------- references
def official_thresholds(n: int, rates: tuple[float, float, float], rounds: tuple[int, int, int]):
    """``Threshold`` of each selection round exactly as the official scripts compute it."""
    (r1, r2, r3), (i1, i2, i3) = rates, rounds
    out = []
    for rn in range(1, i1 + i2 + i3 + 1):
        if rn > i1:
            if rn > i1 + i2:
                out.append(int(n * ((r1**i1) * (r2**i2) * (r3 ** (rn - (i1 + i2))))))
            else:
                out.append(int(n * ((r1**i1) * (r2 ** (rn - i1)))))
        else:
            out.append(int(n * (r1**rn)))
    return out


def official_fkl(labels: list[int], predictions: list[list[int]], k: int, warm_up: int) -> set:
    """FkL examples after the given epochs, by the official counting loop.

    ``predictions[e][t]`` is the prediction of example ``t`` at epoch ``e``; epochs with
    index > ``warm_up`` count (the official ``WARM_UP_EPOCHS``).
    """
    n = len(labels)
    counter, last, before_last, found = [0] * n, [101] * n, [101] * n, set()
    for index, row in enumerate(predictions):
        if index <= warm_up:
            continue
        for t, (label, prediction) in enumerate(zip(labels, row, strict=True)):
            if label == prediction:
                if k == 1:
                    ok = True
                elif k == 2:
                    ok = prediction == last[t]
                else:
                    ok = prediction == last[t] and prediction == before_last[t]
                if ok:
                    counter[t] += 1
                    if counter[t] == 1:
                        found.add(t)
            if k >= 3:
                before_last[t] = last[t]
            if k >= 2:
                last[t] = prediction
    return found


# ----------------------------------------------------------------------------- the core
def test_doctests() -> None:
    assert doctest.testmod(late_stopping_module, raise_on_error=True).failed == 0


@pytest.mark.parametrize(
    ("rates", "rounds"),
    [
        ((0.955, 0.955, 0.955), (4, 4, 4)),  # CIFAR-10, 40%
        ((0.98, 0.98, 0.98), (4, 4, 4)),  # CIFAR-10, 20%
        ((0.975, 0.975, 0.975), (22, 5, 0)),  # CIFAR-100, 40%
        ((0.9, 0.95, 0.99), (2, 3, 1)),  # one rate per stage
    ],
)
def test_round_targets_are_the_official_thresholds(rates, rounds) -> None:
    plans = round_schedule(45000, rates, rounds)
    assert [p.target for p in plans] == official_thresholds(45000, rates, rounds)
    assert [p.k for p in plans] == [1] * rounds[0] + [2] * rounds[1] + [3] * rounds[2]
    assert [p.round for p in plans] == list(range(1, sum(rounds) + 1))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("warm_up", [0, 2, 6])
def test_fkl_selection_is_the_official_counting(k, warm_up) -> None:
    gen = torch.Generator().manual_seed(10 * k + warm_up)
    n, epochs, classes = 300, 12, 3
    labels = torch.randint(classes, (n,), generator=gen)
    # Each example is right with its own probability, so FkL epochs spread out.
    p_right = torch.rand(n, generator=gen)
    predictions = []
    store = DynamicsStore(n)
    for epoch in range(epochs):
        right = torch.rand(n, generator=gen) < p_right
        other = (labels + torch.randint(1, classes, (n,), generator=gen)) % classes
        prediction = torch.where(right, labels, other)
        predictions.append(prediction.tolist())
        logits = torch.nn.functional.one_hot(prediction, classes).float()
        store.update(SampleBatch.create(torch.arange(n), labels, logits, torch.zeros(n)), epoch)
    # The official WARM_UP_EPOCHS = w skips epochs 0..w, i.e. warmup_epochs = w + 1 here.
    expected = official_fkl(labels.tolist(), predictions, k, warm_up)
    current = torch.arange(n)
    got = fkl_selection(store.learned_mask(k, since=warm_up + 1), current)
    assert set(got.tolist()) == expected
    assert 0 < len(expected) < n
    # Restricted to a subset, it is the subset's part of the same set.
    subset = torch.arange(0, n, 3)
    got_subset = fkl_selection(store.learned_mask(k, since=warm_up + 1), subset)
    assert set(got_subset.tolist()) == expected & set(subset.tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rate=1.0), "rate must be in"),
        (dict(rate=0.0), "rate must be in"),
        (dict(rate=(0.9, 0.9)), "one per k stage"),
        (dict(rate=True), "rate must"),
        (dict(rounds_per_k=4), "rounds_per_k must be a sequence"),
        (dict(rounds_per_k=(0, 0)), "at least one round"),
        (dict(rounds_per_k=(2, -1)), "integers >= 0"),
        (dict(warmup_epochs=-1), "warmup_epochs must be an integer >= 0"),
        (dict(final_epochs=0), "final_epochs must be an integer >= 1"),
        (dict(max_round_epochs=1.5), "max_round_epochs must be an integer >= 1"),
        (dict(final_scheduler=partial(MultiStepLR, milestones=[1])), "needs final_optimizer"),
        (dict(final_optimizer=0.02), "final_optimizer must be a callable"),
    ],
)
def test_bad_hyperparameters_raise_with_the_value(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LateStopping(**kwargs)


def test_needs_training_dynamics(tmp_path) -> None:
    trainer = make_trainer(tmp_path, [LateStopping(**FAST)])
    with pytest.raises(RuntimeError, match="no TrainingDynamics callback"):
        trainer.fit(model(), datamodule=digits())


def test_needs_a_data_source_that_can_shrink(tmp_path) -> None:
    dm = digits()
    loader = dm.train_dataloader()
    trainer = make_trainer(tmp_path, [TrainingDynamics(), LateStopping(**FAST)])
    with pytest.raises(ValueError, match=r"train_dataloaders=.*DataModule.*set_train_indices"):
        trainer.fit(model(), train_dataloaders=loader)


def test_warns_when_max_epochs_cannot_hold_the_schedule(tmp_path) -> None:
    late = LateStopping(**FAST)
    assert late.min_epochs_needed() == (1 + 1) + (1 + 2) + 2
    trainer = make_trainer(tmp_path, [TrainingDynamics(), late], max_epochs=1)
    with pytest.warns(UserWarning, match="needs at least 7 epochs") as record:
        trainer.fit(model(), datamodule=digits())
    assert any("training ended in selection round 1 of 2" in str(w.message) for w in record)


# ----------------------------------------------------------------------------- end to end
class Recorder(pl.Callback):
    """Per epoch: the indices loaded, the weights and optimizer state at the first batch."""

    def __init__(self) -> None:
        self.indices: dict[int, list[int]] = {}
        self.first_weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer_state_empty: dict[int, bool] = {}
        self.initial: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        self.indices.setdefault(epoch, []).extend(batch[2].tolist())
        if batch_idx == 0:
            self.first_weights[epoch] = {
                k: v.detach().clone() for k, v in pl_module.state_dict().items()
            }
            self.optimizer_state_empty[epoch] = len(trainer.optimizers[0].state) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("late")
    pl.seed_everything(0, verbose=False)
    dm, net = digits(), model()
    dynamics, late, recorder = TrainingDynamics(), LateStopping(**FAST), Recorder()
    trainer = make_trainer(
        root,
        [dynamics, late, recorder],
        max_epochs=-1,
        logger=CSVLogger(root),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(net, datamodule=dm)
    return SimpleNamespace(
        root=root, dm=dm, model=net, late=late, recorder=recorder, trainer=trainer
    )


def round_starts(late: LateStopping) -> list[int]:
    starts = [0]
    for record in late.rounds:
        starts.append(starts[-1] + int(record["epochs"]))
    return starts


def test_rounds_follow_the_schedule_and_training_stops(trained) -> None:
    late, n = trained.late, len(trained.dm.train_dataset)
    plans = round_schedule(n, FAST["rate"], FAST["rounds_per_k"])
    assert [int(r["target"]) for r in late.rounds] == [p.target for p in plans]
    assert [int(r["k"]) for r in late.rounds] == [1, 2]
    for record in late.rounds:
        assert record["reached_target"] == 1.0
        assert record["kept"] >= record["target"]
        assert record["epochs"] >= FAST["warmup_epochs"] + record["k"]
    assert late.finished and late.in_final_run
    starts = round_starts(late)
    # The final run trains exactly final_epochs epochs, then the callback stops the fit.
    assert trained.trainer.current_epoch == starts[-1] + FAST["final_epochs"]
    assert late.kept.numel() == late.rounds[-1]["kept"]


def test_each_round_loads_only_its_set(trained) -> None:
    late, recorder = trained.late, trained.recorder
    n = len(trained.dm.train_dataset)
    starts = round_starts(late)
    sets = [torch.arange(n)]
    # Recompute each round's next set from the store: the FkL examples of the round's set.
    store = find_callback(trained.trainer, TrainingDynamics).store
    for i, record in enumerate(late.rounds):
        since = starts[i] + FAST["warmup_epochs"]
        # Observations of later rounds must not count: replay on a store cut at the round end.
        cut = DynamicsStore(n)
        history = store.history[:, : starts[i + 1]]
        for epoch in range(history.shape[1]):
            seen = history[:, epoch] >= 0
            index = torch.nonzero(seen).reshape(-1)
            right = history[index, epoch] == 1
            cut.record(index, right, torch.zeros(len(index)), torch.zeros(len(index)), epoch)
        expected = fkl_selection(cut.learned_mask(int(record["k"]), since=since), sets[-1])
        assert expected.numel() == record["kept"]
        sets.append(expected)
    assert torch.equal(late.kept, sets[-1])
    bounds = [*starts, trained.trainer.current_epoch]
    for i, members in enumerate(sets):
        for epoch in range(bounds[i], bounds[i + 1]):
            loaded = recorder.indices[epoch]
            assert sorted(loaded) == members.tolist(), f"epoch {epoch} of round {i + 1}"


def test_each_round_restarts_from_the_initial_weights_and_fresh_optimizer(trained) -> None:
    recorder = trained.recorder
    for start in round_starts(trained.late):
        for key, value in recorder.initial.items():
            assert torch.equal(recorder.first_weights[start][key], value), (start, key)
        assert recorder.optimizer_state_empty[start]
    # Between round starts the model trains on (its weights move, momentum builds up).
    assert not recorder.optimizer_state_empty[1]
    assert any(
        not torch.equal(recorder.first_weights[1][k], v) for k, v in recorder.initial.items()
    )


def test_removed_samples_are_mostly_the_noisy_ones(trained) -> None:
    late, dm = trained.late, trained.dm
    removed = torch.ones(len(dm.train_dataset), dtype=torch.bool)
    removed[late.kept] = False
    precision = float(dm.noise_mask[removed].float().mean())
    recall = float(removed[dm.noise_mask].float().mean())
    assert late.detection["precision"] == pytest.approx(precision)
    assert late.detection["recall"] == pytest.approx(recall)
    # Random removal has precision = the noise rate (0.4).
    assert precision > 0.7, late.detection


def test_logged_per_epoch_and_per_round(trained) -> None:
    import csv

    metrics = Path(trained.trainer.logger.log_dir) / "metrics.csv"
    with open(metrics, newline="") as handle:
        rows = list(csv.DictReader(handle))

    def series(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key)]

    assert len(series("late_stopping/kept")) == trained.trainer.current_epoch
    assert series("late_stopping/round")[-1] == len(FAST["rounds_per_k"]) + 1
    assert series("late_stopping/removed_precision") == pytest.approx(
        [r["removed_precision"] for r in trained.late.rounds]
    )
    assert max(series("late_stopping/learned")) >= trained.late.rounds[0]["target"]


# ----------------------------------------------------------------------------- resume
def _fit_with_checkpoints(root: Path, *, max_epochs: int = -1, ckpt: Path | None = None):
    pl.seed_everything(0, verbose=False)
    net, late = model(), LateStopping(**FAST)
    every = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer(
        root,
        [TrainingDynamics(), late, every],
        max_epochs=max_epochs,
        enable_checkpointing=True,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, datamodule=digits(), ckpt_path=ckpt)
    return net, late


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
# Slow (27 s): the default suite covers the same switch with a real SIGKILL,
# tests/test_crash_resume.py::test_late_stopping_survives_sigkills_around_a_round_switch.
@pytest.mark.slow
def test_resume_across_a_round_boundary_is_exact(tmp_path) -> None:
    straight, late = _fit_with_checkpoints(tmp_path / "a")
    first_end = int(late.rounds[0]["epochs"]) - 1  # the epoch that ended round 1
    for epoch in (first_end, first_end + 1):  # checkpoint at the switch, and one epoch in
        ckpt = tmp_path / "a" / f"epoch={epoch}.ckpt"
        resumed, late_resumed = _fit_with_checkpoints(tmp_path / f"r{epoch}", ckpt=ckpt)
        assert late_resumed.rounds == late.rounds
        assert torch.equal(late_resumed.kept, late.kept)
        for (key, a), b in zip(
            straight.state_dict().items(), resumed.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{key} differs (epoch {epoch})")


def test_cli_recipe_runs_end_to_end(tmp_path) -> None:
    from lightning_noise.cli import build_cli

    cli = build_cli(
        [
            "--config",
            str(ROOT / "recipes" / "digits_late_stopping.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet",
            "--data.init_args.image_size=8",
            "--trainer.callbacks.final_epochs=1",
            "--trainer.callbacks.rounds_per_k=[1]",
            "--trainer.callbacks.rate=0.5",
            "--trainer.callbacks.warmup_epochs=0",
        ],
        run=False,
    )
    late = find_callback(cli.trainer, LateStopping)
    assert late is not None and late.rounds_per_k == (1,)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert late.finished and len(late.rounds) == 1
    assert cli.datamodule.train_indices.tolist() == late.kept.tolist()


# ------------------------------------------------------------------- the final run's optimizer
class LRRecorder(pl.Callback):
    """The optimizer's type and LR each epoch trains with."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        self.seen[trainer.current_epoch] = (
            type(optimizer).__name__,
            optimizer.param_groups[0]["lr"],
        )


def _fit_final_run(root: Path, ckpt: Path | None = None):
    pl.seed_everything(0, verbose=False)
    late = LateStopping(
        rate=0.3,  # one short round: 30% of the set learned once
        rounds_per_k=(1,),
        warmup_epochs=0,
        final_epochs=5,
        final_optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        final_scheduler=partial(MultiStepLR, milestones=[1, 3], gamma=0.5),
    )
    net, recorder = model(), LRRecorder()  # the rounds: the module's AdamW(lr=1e-3)
    every = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer(
        root,
        [TrainingDynamics(), late, recorder, every],
        max_epochs=-1,
        enable_checkpointing=True,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, datamodule=digits(), ckpt_path=ckpt)
    return net, late, recorder


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_final_run_uses_its_own_optimizer_and_schedule_and_resumes(tmp_path) -> None:
    """As the official scripts: rounds with one optimizer and no schedule, then a final run
    with its own optimizer and MultiStepLR (here milestones [1, 3]), stepped per epoch."""
    straight, late, recorder = _fit_final_run(tmp_path / "a")
    start = late.round_start_epoch  # the final run's first epoch
    assert late.finished and start > 0
    assert all(recorder.seen[e] == ("AdamW", 1e-3) for e in range(start))
    final = [recorder.seen[e] for e in range(start, start + 5)]
    assert final == [("SGD", 0.05 * 0.5 ** sum(e >= m for m in (1, 3))) for e in range(5)]
    assert "configure_optimizers" not in vars(straight)  # the module's own method is back
    # Resumed from the end of the final run's second epoch: the same LRs and the same weights.
    ckpt = tmp_path / "a" / f"epoch={start + 1}.ckpt"
    resumed, _, recorder2 = _fit_final_run(tmp_path / "b", ckpt=ckpt)
    assert [recorder2.seen[e] for e in range(start + 2, start + 5)] == final[2:]
    for (key, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{key} differs after the resume")


# ------------------------------------------------------------------------------------ DDP
def ddp_main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    recorder, late = Recorder(), LateStopping(**FAST)
    trainer = ddp_trainer([TrainingDynamics(), late, recorder], max_epochs=-1)
    net = model()
    trainer.fit(net, datamodule=digits(batch_size=50))
    result = {
        "params": {k: p.detach() for k, p in net.named_parameters()},
        "kept": late.kept,
        "targets": torch.tensor([r["target"] for r in late.rounds]),
        "epochs": torch.tensor([r["epochs"] for r in late.rounds]),
        "indices": {e: torch.tensor(v) for e, v in recorder.indices.items()},
        "last_epoch": torch.tensor(trainer.current_epoch),
    }
    torch.save(result, Path(out_dir) / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_agree_and_load_only_the_kept_set(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    a, b = ranks
    for key, value in a["params"].items():
        assert torch.equal(value, b["params"][key]), f"{key} diverged across ranks"
    for key in ("kept", "targets", "epochs", "last_epoch"):
        assert torch.equal(a[key], b[key]), key
    assert len(a["epochs"]) == 2
    final_start = int(a["epochs"].sum())
    kept = set(a["kept"].tolist())
    for epoch in range(final_start, int(a["last_epoch"])):
        r0, r1 = set(a["indices"][epoch].tolist()), set(b["indices"][epoch].tolist())
        # Each rank loads a share of the kept set only; together they cover it (the sampler
        # pads the shorter share by repeating kept samples).
        assert r0 | r1 == kept, epoch
        assert abs(len(a["indices"][epoch]) - len(b["indices"][epoch])) == 0


if __name__ == "__main__":
    ddp_main(sys.argv[1])


# ---------------------------------------------- a user's own DataModule, no set_train_indices
class _UserData(pl.LightningDataModule):
    """A plain DataModule written as a user would: Indexed TensorDataset, shuffled loader."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(4, 6, generator=g) * 3
        y = torch.randint(0, 4, (96,), generator=g)
        x = centres[y] + torch.randn(96, 6, generator=g)
        y[:20] = (y[:20] + 1) % 4  # some wrong labels
        self.train_set = Indexed(torch.utils.data.TensorDataset(x, y))
        self.requests = 0

    def train_dataloader(self):
        self.requests += 1
        return torch.utils.data.DataLoader(self.train_set, batch_size=16, shuffle=True)


class _UserNet(PerSampleLossMixin, pl.LightningModule):
    """A user's module: the mixin and reduce_loss / step_outputs, nothing else of ours."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        self.loaded: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.loaded.setdefault(self.current_epoch, []).extend(index.tolist())
        logits = self.net(x)
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        sample_batch = SampleBatch.create(index, y, logits, losses)
        return self.step_outputs(self.reduce_loss(losses, sample_batch), sample_batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def test_a_users_datamodule_without_set_train_indices_is_restricted(tmp_path) -> None:
    data, net = _UserData(), _UserNet()
    late = LateStopping(rate=0.9, rounds_per_k=(1,), warmup_epochs=0, final_epochs=2)
    trainer = make_trainer(tmp_path, [TrainingDynamics(k=1), late], max_epochs=-1)
    trainer.fit(net, datamodule=data)
    assert late.finished and late.kept is not None
    kept = sorted(late.kept.tolist())
    assert len(kept) == int(late.rounds[-1]["kept"]) >= int(96 * 0.9)
    final_epochs = sorted(net.loaded)[-2:]
    for epoch in final_epochs:  # the final run loads exactly the kept set, once per epoch
        assert sorted(net.loaded[epoch]) == kept
    assert sorted(net.loaded[0]) == list(range(96))  # the first round loads everything
    assert data.requests >= 2  # rebuilt after the round
    assert "train_dataloader" not in vars(data)  # the wrapper is removed after fit
