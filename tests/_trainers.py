"""A quiet one-device CPU Trainer for tests, shared by the test modules."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def make_trainer(root: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """``pl.Trainer`` on one CPU device, without logger, checkpoints or progress bar.

    ``max_epochs`` defaults to 1; any keyword overrides a default.
    """
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def ddp_trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """The same quiet Trainer on two CPU processes (``strategy="ddp"``), training only.

    For the scripts that ``tests/_ddp.py`` runs; validation and the sanity check are off.
    """
    options: dict[str, Any] = dict(
        devices=2, strategy="ddp", limit_val_batches=0, num_sanity_val_steps=0
    )
    options.update(kwargs)
    return make_trainer(None, callbacks, **options)
