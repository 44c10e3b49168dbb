"""Callbacks that record a run's epoch-level metrics for the command's own tools.

* :class:`MetricHistory` keeps chosen metrics per epoch in memory (``lightning-noise demo``
  draws and compares them);
* :class:`MetricStream` appends the run's metrics to a JSON-lines file after every validation
  run, as they happen, so that another process can follow the run (``lightning-noise sweep``
  reads it to apply a sweep's ``early_terminate``, as the W&B sweep controller reads a run's
  logged history).

They live apart from :mod:`lightning_noise.demo` and :mod:`lightning_noise.sweep` so that
importing those (``lightning-noise demo --help``) does not load Lightning.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from lightning_noise.sweep import HISTORY_ENV

__all__ = ["HISTORY_KEYS", "MetricHistory", "MetricStream"]

#: Per-epoch metrics the demo records and plots.
HISTORY_KEYS = (
    "train/acc_clean_labels",
    "train/acc_noisy_labels",
    "train/recovered_noisy",
    "val/acc",
)


class MetricHistory(pl.Callback):
    """Records selected epoch-level metrics from ``trainer.callback_metrics``.

    Lightning logs the module's epoch-end metrics after most callbacks' epoch-end hooks run,
    so an epoch is recorded at the start of the next one and at the end of training. A metric
    not logged in an epoch is recorded as NaN.
    """

    def __init__(self, keys: Sequence[str] = HISTORY_KEYS) -> None:
        self.keys = tuple(keys)
        self.history: dict[str, list[float]] = {k: [] for k in self.keys}
        self._recorded = -1

    def _record(self, trainer: pl.Trainer, epoch: int) -> None:
        if epoch <= self._recorded or trainer.sanity_checking:
            return
        for key in self.keys:
            value = trainer.callback_metrics.get(key)
            self.history[key].append(float(value) if value is not None else math.nan)
        self._recorded = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, trainer.current_epoch - 1 if trainer.current_epoch else 0)


class MetricStream(pl.Callback):
    """After each validation run, appends one JSON line of the run's metrics to a file.

    The line holds every number in ``trainer.callback_metrics`` (the values the module and
    the callbacks logged so far, validation ones just updated) plus ``epoch`` and
    ``global_step``; the file is flushed at once, so a reader sees each line as it is
    written. The sanity check writes nothing, and under DDP only rank 0 writes.

    Args:
        path: the file; ``None`` reads it from ``$LIGHTNING_NOISE_HISTORY`` (what
            ``lightning-noise sweep`` sets for each run). Without either, nothing is written.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.path or os.environ.get(HISTORY_ENV)
        if not path or trainer.sanity_checking or not trainer.is_global_zero:
            return
        line: dict[str, float | int] = {}
        for key, value in trainer.callback_metrics.items():
            try:
                line[key] = float(value)
            except (TypeError, ValueError):
                continue
        line.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
