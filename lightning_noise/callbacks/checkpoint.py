"""A ``ModelCheckpoint`` whose every save resumes exactly, at an epoch's end too.

Lightning 2.6 resumes a mid-epoch checkpoint exactly when the training loader is resumable
(our DataModules' are), but not one taken at an epoch's end, measured on digits with a
resumable loader:

- ``ModelCheckpoint(every_n_train_steps=N)`` saves in ``on_train_batch_end``. At an epoch's
  last batch (any N gets there: at each common multiple of N and the epoch's length) the
  checkpoint holds the state from before the epoch's end: before epoch-end validation,
  ``on_train_epoch_end`` (where :class:`~lightning_noise.dynamics.TrainingDynamics` records the
  epoch and Late Stopping ends a round) and the epoch's LR scheduler step. Lightning resumes
  it by counting the epoch as done without those hooks, then the restored loader yields an
  empty epoch: the run goes on one epoch ahead, in another data order.
- A save in ``on_train_epoch_end`` (every epoch-based save when there is no validation)
  resumes by running the epoch's end a second time and shifting the next epoch's order by one.

:class:`ResumableCheckpoint` makes every save that falls on an epoch's end in
``on_train_epoch_end``, after every other callback and the module (Lightning calls
checkpoint callbacks last), and records it as a checkpoint of the finished epoch
(:func:`lightning_noise._compat.checkpoint_as_epoch_finished`), which Lightning resumes at
the next epoch's start. Every other save is ``ModelCheckpoint``'s own.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_noise._compat import (
    at_last_train_batch,
    checkpoint_as_epoch_finished,
    saved_as_epoch_finished,
    start_epoch_as_new,
)

__all__ = ["ResumableCheckpoint"]


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) whose saves at an epoch's end resume exactly.

    - A save that ``every_n_train_steps`` or ``train_time_interval`` would make at the last
      training batch of an epoch is made at the end of that epoch instead (same step count).
    - ``save_on_train_epoch_end`` defaults to ``True``: epoch-based saves happen at the end of
      the training epoch, after its validation (so ``monitor`` can name a validation metric),
      not in ``on_validation_end`` before the epoch's end. Validation that runs several times
      an epoch (``val_check_interval``) then gets no save of its own; pass
      ``save_on_train_epoch_end=False`` for ``ModelCheckpoint``'s behaviour (a save after such
      a validation resumes as Lightning resumes it).
    - A save at the epoch's end is recorded as a checkpoint of the finished epoch, so a run
      resumed from it starts the next epoch as the uninterrupted run did (tests:
      ``tests/test_crash_resume.py``, a real SIGKILL).
    """

    def __init__(self, *args: Any, save_on_train_epoch_end: bool | None = True, **kwargs: Any):
        super().__init__(*args, save_on_train_epoch_end=save_on_train_epoch_end, **kwargs)
        self._deferred_batch_end: int | None = None
        self._at_epoch_end = False
        self._resumed_at_epoch_end = False

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._resumed_at_epoch_end = saved_as_epoch_finished(checkpoint)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._resumed_at_epoch_end:
            self._resumed_at_epoch_end = False
            start_epoch_as_new(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if at_last_train_batch(trainer):
            # ModelCheckpoint's decision (step count, time) is taken at the epoch's end
            # instead: the global step does not change in between.
            self._deferred_batch_end = batch_idx
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._at_epoch_end = True
        try:
            if self._deferred_batch_end is not None:
                batch_idx, self._deferred_batch_end = self._deferred_batch_end, None
                super().on_train_batch_end(trainer, pl_module, None, None, batch_idx)
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self._at_epoch_end = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._at_epoch_end and "loops" in checkpoint:
            checkpoint_as_epoch_finished(checkpoint)
