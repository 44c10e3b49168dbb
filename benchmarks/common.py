"""Shared helpers for benchmark scripts: device description and the long-format CSV."""

from __future__ import annotations

import csv
import datetime as dt
import platform
from pathlib import Path

import lightning
import torch

RESULTS_CSV = Path(__file__).with_name("results.csv")
FIELDS = ("date", "benchmark", "case", "metric", "value", "device", "torch", "lightning")


def device_name() -> str:
    """The accelerator's name, or the CPU's with its core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def append_results(benchmark: str, rows: list[tuple[str, str, float]]) -> None:
    """Append ``(case, metric, value)`` rows to ``benchmarks/results.csv``."""
    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(FIELDS)
        today = dt.date.today().isoformat()
        for case, metric, value in rows:
            writer.writerow(
                [
                    today,
                    benchmark,
                    case,
                    metric,
                    f"{value:.6g}",
                    device_name(),
                    torch.__version__,
                    lightning.__version__,
                ]
            )
