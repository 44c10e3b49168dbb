"""``lightning-noise demo``: methods side by side on the embedded digits with label noise.

Each row of :data:`DEMO_ROWS` is a recipe under ``recipes/`` run through the same
LightningCLI as ``lightning-noise fit``; the demo then tests the final model, prints one
results table and writes a PNG of the memorisation curve (training accuracy against the
given labels, on clean-labelled and on noisy-labelled samples, per epoch).

Each row prints ``row 3/10: <name>`` as it starts. A row whose method had not started acting
by the last epoch (a selection method still in its warm-up or at a forget rate of 0, Late
Stopping before its first round ends) gets a note under the table: its figures are those of
plain training, and the note says which schedule was not reached.

To add a method to the demo, write its recipe and append one :class:`DemoRow`.

Lightning is imported when a row runs, not with this module: ``lightning-noise demo --help``
and ``--list`` start at once.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["DEMO_ROWS", "DemoRow", "find_recipe", "main", "not_acting_note", "run_row"]


@dataclass(frozen=True)
class DemoRow:
    """One method in the demo.

    Attributes:
        name: display name.
        recipe: file under ``recipes/``.
        callbacks: presets under ``configs/callbacks/`` appended to the recipe's callbacks.
        args: extra CLI arguments (e.g. ``--trainer.callbacks.rho=0.5`` sets the last
            appended callback's ``rho``).
    """

    name: str
    recipe: str
    callbacks: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


#: The demo's rows, in display order. Later methods append theirs here. The SAM family uses
#: the radius that wins on this small, fast-memorising problem (benchmarks/RESULTS.md).
DEMO_ROWS: list[DemoRow] = [
    # The label audit only observes: the baseline row also ranks its suspected noisy labels.
    DemoRow("Cross-entropy (baseline)", "digits_baseline.yaml", ("label_audit.yaml",)),
    DemoRow(
        "GradientNoise",
        "digits_baseline.yaml",
        ("gradient_noise.yaml",),
        ("--trainer.callbacks.eta=0.01",),
    ),
    DemoRow(
        "SAM (rho=0.5)", "digits_baseline.yaml", ("sam.yaml",), ("--trainer.callbacks.rho=0.5",)
    ),
    DemoRow(
        "ASAM (rho=2.0)", "digits_baseline.yaml", ("asam.yaml",), ("--trainer.callbacks.rho=2.0",)
    ),
    DemoRow(
        "FSAM (rho=0.5)",
        "digits_baseline.yaml",
        ("fsam.yaml",),
        ("--trainer.callbacks.rho=0.5", "--trainer.callbacks.mask_interval=10"),
    ),
    DemoRow("Small-loss selection", "digits_baseline.yaml", ("small_loss.yaml",)),
    DemoRow("Adaptive-k", "digits_baseline.yaml", ("adaptive_k.yaml",)),
    DemoRow("Co-teaching", "digits_coteaching.yaml"),
    DemoRow("Late Stopping", "digits_late_stopping.yaml"),
    # A ViT (4 blocks, 15 epochs): compare it with a plain ViT, not with the ResNet rows.
    DemoRow("NoiseFiT (ViT)", "digits_vit_noisefit.yaml"),
]

#: Per-epoch figures that show whether a method has started acting: ``key -> (what "not
#: acting" means, the test that it acted in an epoch given the figure's per-epoch values)``.
#: The sample-selection mixin logs the kept fraction for every sample policy (1.0 during a
#: warm-up or at a forget rate of 0); Late Stopping logs the size of the set it trains on.
ACTION_KEYS: dict[str, tuple[str, Any]] = {
    "train/kept_fraction": ("it kept every sample", lambda values: min(values) < 1.0),
    "coteaching/kept_fraction": ("it kept every sample", lambda values: min(values) < 1.0),
    "late_stopping/kept": (
        "it trained on the full set: no round ended",
        lambda values: min(values) < values[0],
    ),
}


@dataclass
class RowResult:
    row: DemoRow
    metrics: dict[str, float]
    history: dict[str, list[float]] = field(default_factory=dict)
    #: Why the row's figures are those of plain training, when its method never acted.
    note: str | None = None


def find_recipe(name: str, folder: str = "recipes") -> Path:
    """Find a file by name in ``./<folder>`` or the shipped ``<folder>/`` (the installed
    package's copy, or the repository's)."""
    from lightning_noise.recipes import shipped_root

    candidates = [Path(name), Path.cwd() / folder / name, shipped_root() / folder / name]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{name!r} not found (looked in {[str(p) for p in candidates]}); run the demo "
        "from the lightning-noise repository root, or pass the file's path"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_row(row: DemoRow, *, out_dir: Path, extra_args: Sequence[str] = ()) -> RowResult:
    """Fit one recipe, test the final model and return its metrics and history."""
    from lightning_noise.history import HISTORY_KEYS, MetricHistory
    from lightning_noise.lightning_cli import build_cli

    history = MetricHistory((*HISTORY_KEYS, *ACTION_KEYS))
    run_dir = out_dir / _slug(row.name)
    args = [
        "--config",
        str(find_recipe(row.recipe)),
        f"--trainer.default_root_dir={run_dir}",
        # Each row logs under its own folder (every recipe configures a logger with save_dir).
        f"--trainer.logger.init_args.save_dir={run_dir}",
        *(f"--trainer.callbacks+={find_recipe(c, 'configs/callbacks')}" for c in row.callbacks),
        *row.args,
        *extra_args,
    ]
    cli = build_cli(args, run=False, trainer_defaults={"callbacks": [history]})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics: dict[str, Any] = {}
    best_val = [v for v in history.history["val/acc"] if not math.isnan(v)]
    metrics["best val/acc"] = max(best_val) if best_val else math.nan
    for key in ("train/acc_clean_labels", "train/acc_noisy_labels", "train/recovered_noisy"):
        values = history.history[key]
        metrics[key] = values[-1] if values else math.nan
    # Test the model as training left it: the memorisation of noisy labels shows here.
    (test_metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics.update({k: float(v) for k, v in test_metrics.items()})
    metrics.update(_detection_metrics(cli.trainer))
    note = not_acting_note(row.name, history.history, _schedule_hint(cli.trainer, cli.model))
    return RowResult(row, metrics, history.history, note)


def not_acting_note(name: str, history: dict[str, list[float]], hint: str = "") -> str | None:
    """A note when the per-epoch ``history`` shows a method that never acted, else ``None``.

    Only rows that log one of :data:`ACTION_KEYS` can get a note: the other methods act from
    the first step.
    """
    for key, (what, acted) in ACTION_KEYS.items():
        values = [v for v in history.get(key, []) if not math.isnan(v)]
        if values and not acted(values):
            epochs = len(values)
            return (
                f"{name} did not act in its {epochs} epoch{'s' * (epochs != 1)} ({what}), so "
                f"its figures are those of plain training{': ' + hint if hint else ''}; "
                "run more epochs (--epochs) to see it act"
            )
    return None


def _schedule_hint(trainer: pl.Trainer, model: pl.LightningModule) -> str:
    """The schedule that delays a method, in words, from its settings."""
    from lightning_noise.callbacks import AdaptiveK, LateStopping, SmallLossSelection
    from lightning_noise.models import CoTeachingClassifier

    for obj in [*trainer.callbacks, model]:
        if isinstance(obj, AdaptiveK):
            return f"its warm-up keeps every sample for warmup_epochs={obj.warmup_epochs} epochs"
        if isinstance(obj, (SmallLossSelection, CoTeachingClassifier)):
            return (
                "its forget rate is 0 in the first epoch and ramps up over "
                f"num_gradual={obj.num_gradual} epochs"
            )
        if isinstance(obj, LateStopping):
            return (
                "its first round ends only after warmup_epochs="
                f"{obj.warmup_epochs} epochs, once enough samples are learned k epochs in a row"
            )
    return ""


def _detection_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """F1 of noisy-label detection by the row's method, where one reports it."""
    for callback in trainer.callbacks:
        detection = getattr(callback, "detection", None)
        if isinstance(detection, dict) and "f1" in detection:
            return {"noise detection F1": float(detection["f1"])}
    return {}


def print_table(results: Sequence[RowResult], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = [
        ("test acc", "test/acc"),
        ("test ECE", "test/ece"),
        ("best val acc", "best val/acc"),
        ("train acc, clean labels", "train/acc_clean_labels"),
        ("train acc, noisy labels", "train/acc_noisy_labels"),
        ("noise detection F1", "noise detection F1"),
    ]
    table = Table(title=title)
    table.add_column("method")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for result in results:
        cells = [result.metrics.get(key, math.nan) for _, key in columns]
        table.add_row(result.row.name, *("-" if math.isnan(c) else f"{c:.3f}" for c in cells))
    # Off a terminal rich assumes 80 columns and wraps the headers; logs read better wide.
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def plot_memorisation(results: Sequence[RowResult], path: Path) -> Path:
    """Two panels, one colour a row: training accuracy against the given labels on clean-
    (solid) and noisy-labelled (dashed) samples per epoch, and validation accuracy.

    Every row has its own colour (any number of rows), each epoch a marker (a 1-epoch demo
    shows one point a line), the epoch axis whole numbers, and the legend sits beside the
    panels."""
    from lightning_noise import plots

    plt = plots._pyplot()
    fig, (mem, val) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colours = plots.distinct_colours(len(results))
    epochs_drawn: set[int] = set()
    for colour, result in zip(colours, results, strict=True):
        h = result.history
        epochs = list(range(1, len(h["train/acc_clean_labels"]) + 1))
        epochs_drawn.update(epochs)
        style = {"color": colour, "markersize": 4}
        mem.plot(epochs, h["train/acc_clean_labels"], marker="o", label=result.row.name, **style)
        mem.plot(epochs, h["train/acc_noisy_labels"], marker="s", linestyle="--", **style)
        val.plot(epochs, h["val/acc"], marker="o", label=result.row.name, **style)
    mem.set_title("Training accuracy vs given label:\nclean-labelled (solid), noisy (dashed)")
    val.set_title("Validation accuracy (clean labels)")
    for ax in (mem, val):
        plots.epoch_axis(ax, sorted(epochs_drawn))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    mem.set_ylabel("accuracy")
    plots.outside_legend(val)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots._save(plt, fig, path)
    return path


def main(argv: Sequence[str] | None = None) -> list[RowResult]:
    """Run the demo rows and report them."""
    parser = argparse.ArgumentParser(
        prog="lightning-noise demo",
        description="Train each demo method on digits with label noise and compare them.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--rows", nargs="*", default=None, help="names of rows to run")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    ns, extra = parser.parse_known_args(argv)
    if ns.list:
        for row in DEMO_ROWS:
            presets = " ".join(f"+configs/callbacks/{c}" for c in row.callbacks)
            print(f"{row.name}: recipes/{row.recipe} {presets} {' '.join(row.args)}")
        return []
    rows = DEMO_ROWS
    if ns.rows:
        known = {r.name: r for r in DEMO_ROWS}
        missing = [n for n in ns.rows if n not in known]
        if missing:
            raise SystemExit(f"unknown demo rows {missing}; choose from {list(known)}")
        rows = [known[n] for n in ns.rows]
    if ns.epochs is not None:
        extra = [*extra, f"--trainer.max_epochs={ns.epochs}"]
    results = []
    for i, row in enumerate(rows, start=1):
        print(f"row {i}/{len(rows)}: {row.name}", flush=True)
        results.append(run_row(row, out_dir=ns.out, extra_args=extra))
    print_table(results, title="lightning-noise demo: digits, 40% symmetric label noise")
    for result in results:
        if result.note:
            print(f"note: {result.note}")
    png = plot_memorisation(results, ns.out / "memorisation.png")
    print(f"memorisation curve written to {png}")
    return results
