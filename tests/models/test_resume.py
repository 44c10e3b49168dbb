"""Crash-and-resume on the real stack: digits, ImageClassifier, TrainingDynamics.

The DataModule's seeded DistributedSampler makes each epoch's order a function of
(seed, epoch) only, so a run resumed from a checkpoint must end bit-identical to one that
never stopped: parameters, optimizer state and the dynamics store.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.models import ImageClassifier


def _run(tmp_path, max_epochs: int, ckpt_path=None, seed: int = 0):
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=128, seed=0
    )
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    dynamics = TrainingDynamics(k=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[dynamics, checkpoint],
        default_root_dir=tmp_path,
        deterministic=True,
    )
    pl.seed_everything(seed, verbose=False)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, dynamics, trainer


def test_resume_is_exact(tmp_path) -> None:
    straight, dyn_straight, _ = _run(tmp_path / "a", max_epochs=3)
    half, dyn_half, _ = _run(tmp_path / "b", max_epochs=1)
    history_after_one = dyn_half.store.history.clone()
    # A different global seed on resume: the result must not depend on global RNG state.
    resumed, dyn_resumed, _ = _run(
        tmp_path / "c", max_epochs=3, ckpt_path=tmp_path / "b" / "last.ckpt", seed=123
    )

    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {name} differs")
    torch.testing.assert_close(dyn_straight.store.history, dyn_resumed.store.history)
    torch.testing.assert_close(
        dyn_straight.store.last_loss, dyn_resumed.store.last_loss, equal_nan=True
    )
    torch.testing.assert_close(dyn_straight.store.aum(), dyn_resumed.store.aum(), equal_nan=True)
    # The state did change along the way: two more epochs were recorded after the checkpoint.
    assert history_after_one.shape[1] == 1 and dyn_resumed.store.history.shape[1] == 3
    # The callback reserved exactly max_epochs columns: N x 3 bytes of history.
    assert dyn_straight.store.epoch_capacity == 3
    assert not torch.equal(
        straight.state_dict()["backbone.fc.weight"], half.state_dict()["backbone.fc.weight"]
    )


# ------------------------------------------------------------------- a kill in mid-epoch
class _Killed(Exception):
    pass


class _KillAt(pl.Callback):
    """Stops the process's training abruptly at one global step (no checkpoint on the way)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Killed


def _mid_epoch_run(root, *, kill_at=None, ckpt_path=None, seed: int = 0):
    from lightning_noise.callbacks import SAM, AdaptiveK, GradientNoise

    pl.seed_everything(seed, verbose=False)
    # Batches of 96: 13 steps an epoch, so the checkpoint at step 20 is mid-epoch.
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=96)
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    callbacks = [
        SAM(rho=0.05),
        GradientNoise(eta=0.01),
        AdaptiveK(warmup_epochs=1),
        TrainingDynamics(k=2),
        ModelCheckpoint(dirpath=root, every_n_train_steps=10, save_last=True, save_top_k=0),
    ]
    if kill_at is not None:
        callbacks.append(_KillAt(kill_at))
    trainer = pl.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
        deterministic=True,
    )
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    except _Killed:
        pass
    return model, trainer, callbacks


def test_resume_from_the_middle_of_an_epoch_is_exact(tmp_path) -> None:
    straight, trainer, cbs = _mid_epoch_run(tmp_path / "a")
    assert trainer.global_step == 40
    _, killed, _ = _mid_epoch_run(tmp_path / "b", kill_at=23)
    assert killed.global_step == 23
    steps_per_epoch = killed.num_training_batches
    assert 20 % steps_per_epoch != 0  # the checkpoint at step 20 is in the middle of an epoch
    resumed, again, cbs_resumed = _mid_epoch_run(
        tmp_path / "c", ckpt_path=tmp_path / "b" / "last.ckpt", seed=7
    )
    assert again.global_step == 40
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {name} differs")
    opt_a, opt_b = trainer.optimizers[0].state_dict(), again.optimizers[0].state_dict()
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][key][name], rtol=0, atol=0)
    for a, b in zip(cbs, cbs_resumed, strict=True):
        if isinstance(a, ModelCheckpoint):
            continue
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            if isinstance(state_a[key], dict):  # the dynamics store
                for k, v in state_a[key].items():
                    torch.testing.assert_close(v, state_b[key][k], rtol=0, atol=0, equal_nan=True)
            else:
                assert state_a[key] == state_b[key], (type(a).__name__, key)
