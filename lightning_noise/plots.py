"""``lightning-noise plot``: PNG figures of a run, or of the robustness benchmark's results.

For a run folder (a ``CSVLogger`` folder, or any folder above one), it reads the logger's
``metrics.csv`` and the ``dynamics.pt`` that :class:`~lightning_noise.dynamics.TrainingDynamics`
writes at the end of training, and draws

* ``memorisation.png``: training accuracy against the given labels on clean- and on
  noisy-labelled samples per epoch (the memorisation curve), and validation accuracy;
* ``loss_distributions.png``: the last training loss of each sample, clean vs noisy labels;
* ``fkl_histogram.png``: the first epoch at which each sample was learned (``k`` epochs right
  in a row), clean vs noisy labels, with a bar for the samples never learned.

Clean vs noisy needs the training set's noise mask (synthetic noise, CIFAR-N); without it the
samples are drawn as one group. For a benchmark ``results.csv`` it draws ``robustness.png``:
the last-epoch test accuracy of every method under every noise setting, with its spread.

Each function returns the PNG's path and the numbers it drew, so tests can check the content.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_noise.data._safe_load import safe_torch_load
from lightning_noise.dynamics.callback import EXPORT_FILE

__all__ = [
    "fkl_histogram",
    "load_export",
    "loss_distributions",
    "main",
    "memorisation_curve",
    "plot_run",
    "robustness_chart",
]

MEMORISATION_KEYS = ("train/acc_clean_labels", "train/acc_noisy_labels", "val/acc")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _latest(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_epoch_metrics(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` from a ``CSVLogger`` file (the last value of an epoch)."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    table[key][epoch] = float(value)
    return table


def memorisation_curve(metrics_csv: Path, out: Path) -> tuple[Path, dict[str, list[float]]]:
    table = read_epoch_metrics(metrics_csv)
    data = {k: [table[k][e] for e in sorted(table[k])] for k in MEMORISATION_KEYS if k in table}
    if not data:
        raise ValueError(
            f"{metrics_csv} has none of {MEMORISATION_KEYS}: was it written by a run of "
            "ImageClassifier with a noisy-label DataModule?"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "train/acc_clean_labels": ("C0", "-", "train, clean-labelled samples"),
        "train/acc_noisy_labels": ("C3", "--", "train, noisy-labelled samples (memorisation)"),
        "val/acc": ("C2", ":", "validation"),
    }
    for key, values in data.items():
        colour, style, label = styles[key]
        ax.plot(range(1, len(values) + 1), values, color=colour, linestyle=style, label=label)
    ax.set(xlabel="epoch", ylabel="accuracy against the given labels", ylim=(0, 1))
    ax.set_title("Memorisation curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out)
    return out, data


def _groups(values: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if mask is None:
        return {"all samples": values}
    return {"clean labels": values[~mask], "noisy labels": values[mask]}


def loss_distributions(export: dict[str, Any], out: Path) -> tuple[Path, dict[str, list[float]]]:
    loss, mask = export["last_loss"].float(), export.get("noise_mask")
    seen = ~torch.isnan(loss)
    groups = _groups(loss, mask)
    groups = {k: v[~torch.isnan(v)] for k, v in groups.items()}
    data = {k: v.tolist() for k, v in groups.items()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = float(loss[seen].max()) if bool(seen.any()) else 1.0
    bins = torch.linspace(0.0, max(top, 1e-6), 41).tolist()
    for (name, values), colour in zip(groups.items(), ("C0", "C3"), strict=False):
        label = f"{name} ({len(values)})"
        ax.hist(values.tolist(), bins=bins, alpha=0.6, color=colour, label=label)
    ax.set(xlabel="last training loss", ylabel="samples")
    ax.set_title("Loss distributions at the end of training")
    ax.legend()
    _save(plt, fig, out)
    return out, data


def fkl_histogram(export: dict[str, Any], out: Path) -> tuple[Path, dict[str, list[int]]]:
    fkl, mask, k = export["first_learned_epoch"].long(), export.get("noise_mask"), export["k"]
    epochs = int(export["history"].shape[1]) if export["history"].dim() == 2 else 0
    never = epochs  # the last bar: never learned
    groups = {name: torch.where(v < 0, never, v) for name, v in _groups(fkl, mask).items()}
    counts = {
        name: torch.bincount(v, minlength=epochs + 1)[: epochs + 1].tolist()
        for name, v in groups.items()
    }
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(counts), 1)
    for i, ((name, c), colour) in enumerate(zip(counts.items(), ("C0", "C3"), strict=False)):
        xs = [x + i * width for x in range(epochs + 1)]
        ax.bar(xs, c, width=width, color=colour, label=name)
    labels = [str(e) for e in range(epochs)] + ["never"]
    step = max(1, (epochs + 1) // 15)
    ax.set_xticks(range(0, epochs + 1, step), labels[::step])
    ax.set(xlabel=f"first epoch learned ({k} epochs right in a row)", ylabel="samples")
    ax.set_title("First-k-epoch learning (FkL)")
    ax.legend()
    _save(plt, fig, out)
    return out, counts


def robustness_chart(
    results_csv: Path, out: Path
) -> tuple[Path, dict[str, dict[str, tuple[float, float]]]]:
    """Grouped bars of ``last_acc_mean`` (+- ``last_acc_std``) of the robustness rows."""
    data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    with open(results_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("benchmark") != "robustness" or "/" not in row.get("case", ""):
                continue
            setting, method = row["case"].split("/", 1)
            if row["metric"] == "last_acc_mean":
                data[setting][method][0] = float(row["value"])
            elif row["metric"] == "last_acc_std":
                data[setting][method][1] = float(row["value"])
    if not data:
        raise ValueError(
            f"{results_csv} has no robustness rows; run `python benchmarks/robustness.py`"
        )
    table = {s: {m: (v[0], v[1]) for m, v in ms.items()} for s, ms in data.items()}
    methods = sorted({m for ms in table.values() for m in ms})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(table) + 3), 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(table))]
        means = [table[s].get(method, (math.nan, 0.0))[0] for s in table]
        spreads = [table[s].get(method, (0.0, 0.0))[1] for s in table]
        ax.bar(xs, means, width=width, yerr=spreads, capsize=2, label=method, color=f"C{i}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(table))], list(table))
    ax.set(ylabel="last-epoch test accuracy", ylim=(0, 1))
    ax.set_title("Robustness to label noise (mean and spread over seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, out)
    return out, table


def load_export(path: str | Path) -> dict[str, Any]:
    """The dict of a ``dynamics.pt``, loaded with ``weights_only=True`` (no code in it runs).

    Raises:
        ValueError: naming the file when it does not load or is not a dynamics export.
    """
    fix = "it is written by the TrainingDynamics callback at the end of training; train again"
    what = f"a TrainingDynamics export ({EXPORT_FILE})"
    export = safe_torch_load(path, what=what, fix=fix)
    needed = ("k", "history", "last_loss", "first_learned_epoch")
    if not isinstance(export, dict) or any(key not in export for key in needed):
        raise ValueError(f"{str(path)!r} is not {what}: it lacks some of {needed}; {fix}")
    return export


def plot_run(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Draw every figure the run folder (or results CSV) at ``path`` allows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder or a results.csv")
    if path.is_file():
        out = Path(out_dir) if out_dir else path.parent
        out.mkdir(parents=True, exist_ok=True)
        return {"robustness": robustness_chart(path, out / "robustness.png")[0]}
    out = Path(out_dir) if out_dir else path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    metrics_csv = _latest(path, "metrics.csv")
    if metrics_csv is not None:
        written["memorisation"] = memorisation_curve(metrics_csv, out / "memorisation.png")[0]
    export_path = _latest(path, EXPORT_FILE)
    if export_path is not None:
        export = load_export(export_path)
        written["loss"] = loss_distributions(export, out / "loss_distributions.png")[0]
        written["fkl"] = fkl_histogram(export, out / "fkl_histogram.png")[0]
    if not written:
        raise ValueError(
            f"found neither metrics.csv nor {EXPORT_FILE} under {path}: plot a run folder "
            "written by a recipe (CSVLogger + TrainingDynamics), or a benchmarks results.csv"
        )
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="lightning-noise plot", description="PNG figures of a run or of benchmark results."
    )
    parser.add_argument("path", help="a run folder (e.g. runs/digits_sam) or a results.csv")
    parser.add_argument("--out", default=None, help="output folder (default <run>/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.path, args.out)
    except (FileNotFoundError, ValueError) as err:
        # A user's mistake (a wrong path, a foreign file): one line, not a traceback.
        raise SystemExit(f"lightning-noise plot: error: {err}") from None
    for name, png in written.items():
        print(f"{name}: {png}")
    return written
