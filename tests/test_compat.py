"""Each private access of lightning_noise._compat, pinned to the installed versions.

When a release of Lightning, torch or torchmetrics moves one of these, the test here fails and
names the function in ``_compat.py`` to update.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric, SumMetric

from lightning_noise._compat import (
    at_last_train_batch,
    attached_trainer,
    can_reload_train_dataloader,
    mark_step_non_finite,
    metrics_restored,
    optimizer_unscales_itself,
    reload_train_dataloader,
)


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.seen_trainer = None

    def training_step(self, batch, batch_idx):
        self.seen_trainer = attached_trainer(self)
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def train_dataloader(self):
        self.requests += 1
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


class _ReloadOnce(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            reload_train_dataloader(trainer)


def _trainer(callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=3,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_attached_trainer_is_none_outside_a_fit_and_the_trainer_inside() -> None:
    module = _Module()
    assert attached_trainer(module) is None
    trainer = _trainer()
    trainer.fit(module, datamodule=_Data())
    assert module.seen_trainer is trainer


def test_reload_train_dataloader_makes_the_fit_loop_request_a_new_loader() -> None:
    assert can_reload_train_dataloader(_trainer())
    without, with_reload = _Data(), _Data()
    _trainer().fit(_Module(), datamodule=without)
    _trainer([_ReloadOnce()]).fit(_Module(), datamodule=with_reload)
    assert without.requests == 1
    assert with_reload.requests == 2  # once at the start, once after the epoch-0 reload


def test_optimizer_unscales_itself_only_for_fused_optimizers() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert optimizer_unscales_itself(torch.optim.SGD(params, lr=0.1)) is False
    assert optimizer_unscales_itself(torch.optim.Adam(params, fused=True)) is True


def test_mark_step_non_finite_makes_the_scaler_skip_and_lower_its_scale() -> None:
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale((weight * 3).sum()).backward()
    scaler.unscale_(optimizer)
    mark_step_non_finite(scaler, optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(2))  # the step was skipped
    assert scaler.get_scale() == 2.0**7


def test_metrics_restored_puts_state_count_and_cached_result_back() -> None:
    module = nn.Module()
    module.total, module.mean = SumMetric(), MeanMetric()
    module.total.update(torch.tensor(2.0))
    module.mean.update(torch.tensor([1.0, 3.0]))
    assert module.total.compute() == 2.0  # caches the result
    with metrics_restored(module):
        module.total.update(torch.tensor(5.0))
        module.mean.update(torch.tensor([100.0]))
        assert module.total.compute() == 7.0
    assert module.total.compute() == 2.0
    assert module.mean.compute() == 2.0
    assert module.total._update_count == 1 and module.mean._update_count == 1


@pytest.mark.parametrize("bad", [None, object()])
def test_can_reload_is_false_without_a_fit_loop(bad) -> None:
    assert can_reload_train_dataloader(bad) is False


class _EpochEnds(pl.Callback):
    def __init__(self) -> None:
        self.last_batch: list[bool] = []
        self.epoch_ends: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_batch.append(at_last_train_batch(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append(trainer.current_epoch)


def test_at_last_train_batch_marks_each_epochs_last_batch() -> None:
    seen = _EpochEnds()
    _trainer([seen]).fit(_Module(), datamodule=_Data())
    assert seen.last_batch == [False, True] * 3


def test_a_checkpoint_rewritten_as_a_finished_epoch_resumes_at_the_next_epoch(tmp_path) -> None:
    """checkpoint_as_epoch_finished, saved_as_epoch_finished and start_epoch_as_new, through
    ResumableCheckpoint: the epoch's end runs once, and the loop counters go on as unbroken."""
    from lightning_noise.callbacks import ResumableCheckpoint

    def run(max_epochs, ckpt_path=None, folder="other"):
        torch.manual_seed(0)
        seen = _EpochEnds()
        saver = ResumableCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            callbacks=[seen, saver],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = _Module()
        trainer.fit(module, datamodule=_Data(), ckpt_path=ckpt_path)
        return module, trainer, seen

    straight, trainer, seen = run(3)
    _, _, first = run(1, folder="ckpt")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"] == 1
    resumed, again, rest = run(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert first.epoch_ends + rest.epoch_ends == seen.epoch_ends == [0, 1, 2]
    assert again.fit_loop.epoch_loop._batches_that_stepped == 6
    assert again.fit_loop.epoch_loop._batches_that_stepped == (
        trainer.fit_loop.epoch_loop._batches_that_stepped
    )
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
