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
