"""``lightning-noise plot``: PNG figures of a run, or of the robustness benchmark's results.

For a run folder (a ``CSVLogger`` folder, or any folder above one), it reads the logger's
``metrics.csv`` and the ``dynamics.pt`` that :class:`~lightning_noise.dynamics.TrainingDynamics`
writes at the end of training, and draws

* ``memorisation.png``: training accuracy against the given labels on clean- and on
  noisy-labelled samples per epoch (the memorisation curve), and validation accuracy;
* ``loss_distributions.png``: the last training loss of each sample, clean vs noisy labels;
* ``fkl_histogram.png``: the first epoch at which each sample was learned (``k`` epochs right
  in a row), clean vs noisy labels, with a bar for the samples never learned.

A resumed run logs into a new ``version_N`` folder; the curve reads every version of the run
in order and places each value at the epoch it was logged with, so the epochs before the
resume stay on the plot (see :func:`run_metrics_files` for how a resumed run is told from a
new one). Clean vs noisy needs the training set's noise mask (synthetic noise, CIFAR-N);
without it the samples are drawn as one group. For a benchmark ``results.csv`` it draws
``robustness.png``: the last-epoch test accuracy of every method under every noise setting,
with its spread.

Every series gets its own colour (:func:`distinct_colours`, for any number of methods) and
legends sit beside the axes, never over the data. Each function returns the PNG's path and
the numbers it drew, so tests can check the content.

torch and matplotlib are imported inside the functions: ``lightning-noise plot --help`` does
not load them.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "distinct_colours",
    "fkl_histogram",
    "load_export",
    "loss_distributions",
    "main",
    "memorisation_curve",
    "plot_run",
    "read_run_metrics",
    "robustness_chart",
    "run_metrics_files",
]

MEMORISATION_KEYS = ("train/acc_clean_labels", "train/acc_noisy_labels", "val/acc")

#: The file TrainingDynamics writes (``lightning_noise.dynamics.callback.EXPORT_FILE``, pinned
#: by tests/test_plots.py; not imported from there, which would load Lightning).
EXPORT_FILE = "dynamics.pt"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> None:
    # "tight" grows the canvas to hold the legends placed beside the axes.
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _latest(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def distinct_colours(n: int) -> list[tuple[float, float, float]]:
    """``n`` colours that are all different, for ``n`` series of one figure.

    Matplotlib's default cycle has ten colours and repeats after them (the 11th series gets
    the 1st one's blue). Up to 10 series this returns that same ``tab10`` palette; up to 20,
    ``tab20`` with its ten strong colours first and their light variants after; beyond, hues
    spaced evenly around the colour wheel, alternating three lightness levels so that
    neighbours differ.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    import colorsys

    from matplotlib import colormaps

    if n <= 10:
        return [tuple(colormaps["tab10"](i)[:3]) for i in range(n)]
    if n <= 20:
        order = [*range(0, 20, 2), *range(1, 20, 2)]  # strong colours, then the light ones
        return [tuple(colormaps["tab20"](i)[:3]) for i in order[:n]]
    levels = (0.35, 0.55, 0.75)
    return [colorsys.hls_to_rgb(i / n, levels[i % 3], 0.75) for i in range(n)]


def outside_legend(ax, **kwargs: Any):
    """A legend to the right of ``ax``, outside the data area (saved with the figure by
    :func:`_save`'s tight bounding box)."""
    kwargs.setdefault("fontsize", 8)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Whole-number epoch ticks over ``epochs`` (1-based), half an epoch of margin each side:
    a 1- or 2-epoch run gets the ticks 1 (and 2), not 0.95, 0.96, ..."""
    from matplotlib.ticker import MaxNLocator

    first, last = (min(epochs), max(epochs)) if epochs else (1, 1)
    ax.set_xlim(first - 0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")


def _read_csv(metrics_csv: Path) -> tuple[dict[str, dict[int, float]], tuple[int, int] | None]:
    """``{metric: {epoch: value}}`` of one ``metrics.csv`` and its first ``(epoch, step)``."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    first: tuple[int, int] | None = None
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            step = int(float(row["step"])) if row.get("step") else 0
            if first is None or (epoch, step) < first:
                first = (epoch, step)
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    table[key][epoch] = float(value)
    return dict(table), first


def read_epoch_metrics(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` from a ``CSVLogger`` file (the last value of an epoch)."""
    return _read_csv(metrics_csv)[0]


def _version(path: Path) -> tuple[int, str]:
    match = re.fullmatch(r"version_(\d+)", path.parent.name)
    return (int(match.group(1)) if match else -1, str(path))


def run_metrics_files(root: Path) -> list[Path]:
    """The ``metrics.csv`` files of the newest run under ``root``, oldest version first.

    A ``CSVLogger`` writes ``<save_dir>/<name>/version_N/metrics.csv`` and starts a new
    ``version_N`` whenever a run starts, resumed or not. The files are grouped by the folder
    holding their ``version_N`` folders; the group with the newest file is the run.
    """
    groups: dict[Path, list[Path]] = defaultdict(list)
    for path in root.rglob("metrics.csv"):
        versioned = _version(path)[0] >= 0
        groups[path.parent.parent if versioned else path.parent].append(path)
    if not groups:
        return []
    newest = max(groups.values(), key=lambda files: max(f.stat().st_mtime for f in files))
    return sorted(newest, key=_version)


def read_run_metrics(files: Sequence[Path]) -> tuple[dict[str, dict[int, float]], list[Path]]:
    """``{metric: {epoch: value}}`` of a run logged across ``files`` (its versions, in order),
    and the files that made it.

    A version whose first logged ``(epoch, step)`` comes after the previous version's first
    one continues it (a resume: it starts where the checkpoint left off): its values are
    placed at their logged epochs, over the earlier version's values for the same epochs (an
    epoch cut short by the crash is logged again in full), and the epochs before it are kept.
    A version that starts no later than the previous one is a new run of the same recipe:
    the earlier versions are dropped.
    """
    merged: dict[str, dict[int, float]] = defaultdict(dict)
    used: list[Path] = []
    previous: tuple[int, int] | None = None
    for path in files:
        table, first = _read_csv(path)
        if first is None:  # a run that logged nothing (it failed at once)
            continue
        if previous is not None and first <= previous:
            merged, used = defaultdict(dict), []
        for key, by_epoch in table.items():
            merged[key].update(by_epoch)
        used.append(path)
        previous = first
    return {k: dict(sorted(v.items())) for k, v in merged.items()}, used


def memorisation_curve(
    metrics_csv: Path | Sequence[Path], out: Path
) -> tuple[Path, dict[str, dict[int, float]]]:
    """The memorisation curve of one ``metrics.csv`` or of a resumed run's files, in order.

    Returns the PNG's path and ``{metric: {epoch: value}}`` as drawn (0-based epochs as
    logged; the figure counts them from 1).
    """
    files = [Path(metrics_csv)] if isinstance(metrics_csv, (str, Path)) else list(metrics_csv)
    table, _ = read_run_metrics(files)
    data = {k: table[k] for k in MEMORISATION_KEYS if k in table}
    if not data:
        raise ValueError(
            f"{', '.join(map(str, files))} has none of {MEMORISATION_KEYS}: was it written by "
            "a run of ImageClassifier with a noisy-label DataModule?"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    blue, _, green, red = distinct_colours(4)
    styles = {
        "train/acc_clean_labels": (blue, "-", "o", "train, clean-labelled samples"),
        "train/acc_noisy_labels": (red, "--", "s", "train, noisy-labelled samples\n(memorisation)"),
        "val/acc": (green, ":", "^", "validation"),
    }
    all_epochs = sorted({e + 1 for by_epoch in data.values() for e in by_epoch})
    for key, by_epoch in data.items():
        colour, style, marker, label = styles[key]
        epochs = [e + 1 for e in by_epoch]  # logged epochs are 0-based
        ax.plot(
            epochs,
            list(by_epoch.values()),
            color=colour,
            linestyle=style,
            marker=marker,  # a one-epoch run still shows its point
            markersize=4,
            label=label,
        )
    epoch_axis(ax, all_epochs)
    ax.set(ylabel="accuracy against the given labels", ylim=(0, 1))
    ax.set_title("Memorisation curve")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    _save(plt, fig, out)
    return out, data


def _groups(values: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if mask is None:
        return {"all samples": values}
    return {"clean labels": values[~mask], "noisy labels": values[mask]}


def loss_distributions(export: dict[str, Any], out: Path) -> tuple[Path, dict[str, list[float]]]:
    import torch

    loss, mask = export["last_loss"].float(), export.get("noise_mask")
    seen = ~torch.isnan(loss)
    groups = _groups(loss, mask)
    groups = {k: v[~torch.isnan(v)] for k, v in groups.items()}
    data = {k: v.tolist() for k, v in groups.items()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = float(loss[seen].max()) if bool(seen.any()) else 1.0
    bins = torch.linspace(0.0, max(top, 1e-6), 41).tolist()
    blue, _, _, red = distinct_colours(4)
    for (name, values), colour in zip(groups.items(), (blue, red), strict=False):
        label = f"{name} ({len(values)})"
        ax.hist(values.tolist(), bins=bins, alpha=0.6, color=colour, label=label)
    ax.set(xlabel="last training loss", ylabel="samples")
    ax.set_title("Loss distributions at the end of training")
    outside_legend(ax)
    _save(plt, fig, out)
    return out, data


def fkl_histogram(export: dict[str, Any], out: Path) -> tuple[Path, dict[str, list[int]]]:
    import torch

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
    blue, _, _, red = distinct_colours(4)
    for i, ((name, c), colour) in enumerate(zip(counts.items(), (blue, red), strict=False)):
        xs = [x + i * width for x in range(epochs + 1)]
        ax.bar(xs, c, width=width, color=colour, label=name)
    labels = [str(e) for e in range(epochs)] + ["never"]
    step = max(1, (epochs + 1) // 15)
    ax.set_xticks(range(0, epochs + 1, step), labels[::step])
    ax.set(xlabel=f"first epoch learned ({k} epochs right in a row)", ylabel="samples")
    ax.set_title("First-k-epoch learning (FkL)")
    outside_legend(ax)
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
    colours = distinct_colours(len(methods))  # the default cycle repeats after 10 methods
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(table))]
        means = [table[s].get(method, (math.nan, 0.0))[0] for s in table]
        spreads = [table[s].get(method, (0.0, 0.0))[1] for s in table]
        ax.bar(xs, means, width=width, yerr=spreads, capsize=2, label=method, color=colours[i])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(table))], list(table))
    ax.set(ylabel="last-epoch test accuracy", ylim=(0, 1))
    ax.set_title("Robustness to label noise (mean and spread over seeds)")
    outside_legend(ax, title="method")
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
    from lightning_noise.data._safe_load import safe_torch_load

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
    metrics_files = run_metrics_files(path)
    if metrics_files:
        written["memorisation"] = memorisation_curve(metrics_files, out / "memorisation.png")[0]
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
