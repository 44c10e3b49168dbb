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
