"""``WandbLogger``: Lightning's W&B logger, offline by itself when there are no credentials.

Lightning's ``WandbLogger`` with three additions:

* ``offline=None`` (the default) decides for you: online when W&B credentials exist
  (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``) and ``WANDB_MODE`` is not
  ``offline``; offline otherwise, saying so and how to upload the run later
  (``wandb sync <run dir>``).
* At the end of the run it writes the last value of every logged metric to
  ``lightning-noise-summary.json`` in the run's files folder. An offline W&B run otherwise
  keeps its metrics only in its binary ``.wandb`` file; this file lets a person, a local sweep
  (``lightning-noise sweep``) or a test read them, and ``wandb sync`` uploads it with the run.
* :meth:`log_figure_file` logs a PNG written by a callback (the label audit's plot) as an
  image; :meth:`log_csv_table` logs a CSV report as a W&B table.
"""

from __future__ import annotations

import csv
import json
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

__all__ = ["SUMMARY_FILE", "WandbLogger", "wandb_credentials"]

SUMMARY_FILE = "lightning-noise-summary.json"


def wandb_credentials() -> str | None:
    """Where W&B credentials come from (``"WANDB_API_KEY"`` or ``"netrc"``), else ``None``."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        if netrc.netrc().authenticators(host.rstrip("/")):
            return "netrc"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return None


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, offline when it must be (see the module docstring).

    Args:
        offline: ``True``/``False`` force the mode; ``None`` chooses from the credentials and
            ``WANDB_MODE``.
        **kwargs: Everything Lightning's ``WandbLogger`` takes (``project``, ``name``,
            ``save_dir``, ``log_model``, ...).
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        reason = None
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "").lower()
            if mode in ("offline", "dryrun"):
                offline, reason = True, f"WANDB_MODE={mode}"
            elif mode != "disabled" and wandb_credentials() is None:
                offline, reason = True, "no W&B credentials (WANDB_API_KEY or `wandb login`)"
            else:
                offline = False
        self.offline_reason = reason
        self._last_metrics: dict[str, float] = {}
        super().__init__(*args, offline=offline, **kwargs)
        if reason is not None:
            rank_zero_info(
                f"W&B: {reason}: logging offline under {self.save_dir or '.'}/wandb; upload the "
                "run later with `wandb sync <run dir>`"
            )

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            try:
                self._last_metrics[key] = float(value)
            except (TypeError, ValueError):
                continue
        super().log_metrics(metrics, step)

    @property
    def run_dir(self) -> Path | None:
        """The W&B run's folder (``.../wandb/offline-run-...`` when offline), once it exists."""
        if self._experiment is None:
            return None
        return Path(self._experiment.dir).parent

    def write_summary(self) -> Path | None:
        """Write the last value of every logged metric to the run's files folder."""
        if self._experiment is None:
            return None
        path = Path(self._experiment.dir) / SUMMARY_FILE
        path.write_text(json.dumps(self._last_metrics, indent=1, sort_keys=True))
        return path

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.write_summary()
            if self._offline:
                rank_zero_info(f"W&B offline run: upload it with `wandb sync {self.run_dir}`")
        super().finalize(status)

    @rank_zero_only
    def log_figure_file(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """Log the image file at ``path`` (a PNG a callback wrote) under ``key``."""
        self.log_image(key=key, images=[os.fspath(path)], step=step)

    @rank_zero_only
    def log_csv_table(self, key: str, path: str | os.PathLike, max_rows: int = 1000) -> None:
        """Log the first ``max_rows`` rows of a CSV file (header first) as a W&B table."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            self.log_table(key=key, columns=rows[0], data=rows[1 : max_rows + 1])
