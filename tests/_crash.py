"""Callbacks for the kill-and-resume tests: a real SIGKILL, and a final checkpoint.

``tests/test_crash_resume.py`` puts this folder on ``PYTHONPATH`` and names these classes in
the ``lightning-noise fit`` configs it writes (``class_path: _crash.KillAt``), so the CLI in a
subprocess builds them as it builds any user callback.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl


class KillAt(pl.Callback):
    """Kills this process with SIGKILL as the batch of global step ``step`` starts, once.

    Nothing runs after it (no ``finally``, no checkpoint, no teardown), as when a machine is
    preempted or the out-of-memory killer strikes. Each kill happens once per rank: a marker
    file in ``marker_dir`` remembers it, so a run resumed from before that step goes on past
    it, as the job a supervisor restarts does. Under DDP every rank kills itself at the same
    step, as when the whole job is taken down.
    """

    def __init__(self, steps: list[int], marker_dir: str) -> None:
        self.steps = list(steps)
        self.marker_dir = Path(marker_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step not in self.steps:
            return
        marker = self.marker_dir / f"killed-at-{trainer.global_step}-rank-{trainer.global_rank}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


class SaveAtEnd(pl.Callback):
    """Writes a full checkpoint to ``path`` when training ends, whatever step that is."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(Path(self.path))
