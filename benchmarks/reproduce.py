"""Reproduce one row of docs/reproducing.md: run its recipe(s), print the paper's number and ours.

Usage::

    python benchmarks/reproduce.py --list
    python benchmarks/reproduce.py coteaching-cifar10-pair45 --data-dir data \\
        --trainer-config configs/trainer/gpu_bf16.yaml

Each row names a paper's headline setting and the recipe(s) that set it up. The script fits
each recipe through the ``lightning-noise`` CLI (the same parser, recipes and overrides as
``lightning-noise run <recipe>``), with the data read from ``--data-dir``, then tests the model
as training left it and prints, per recipe, the paper's number, ours (``test/acc`` in percent)
and the difference. Late Stopping's model at the end of ``fit`` is that of its final run, so
its number is the final run's; if the final run did not finish (a run cut short by an
override), the script says so.

``--data-dir`` is the folder holding the dataset: for CIFAR, the one with
``cifar-10-batches-py/`` or ``cifar-100-python/`` (and, for CIFAR-N, ``CIFAR-10_human.pt`` or
``CIFAR-100_human.pt``); for the ImageNet rows, the one with ``train/`` and ``val/``. Any
further ``--key=value`` arguments are passed to the CLI after the recipe (e.g.
``--trainer.max_epochs=10``); a run with such overrides is recorded as shortened.

Results are appended to ``benchmarks/results.csv`` (benchmark ``reproduce``, case
``<row>/<recipe>``, metrics ``test_acc`` and ``paper_test_acc`` as fractions).

:data:`ROWS` is the one place the rows are kept: ``docs/reproducing.md``'s table is checked
against it by ``tests/test_reproduce.py``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Run:
    """One recipe of a row and the paper's test accuracy (%) for it (``None``: not in our
    notes)."""

    recipe: str
    paper: float | None


@dataclass(frozen=True)
class Row:
    """A row of docs/reproducing.md's table: the cells as the doc shows them, and the runs."""

    name: str
    paper: str
    setting: str
    number: str  # the paper's number and where it comes from, as the doc's cell
    recipes: str  # the recipe cell: the recipe names in backticks, and notes
    runs: tuple[Run, ...]


ROWS: tuple[Row, ...] = (
    Row(
        "sam-cifar10-sym40",
        "SAM (Foret et al., ICLR 2021)",
        "CIFAR-10, 40% symmetric noise",
        "93.4 vs SGD 68.8 (ResNet-32; label-noise table, quoted second-hand)",
        "`cifar10_sam` (CIFAR ResNet-18: no ResNet-32 in timm)",
        (Run("cifar10_sam", 93.4),),
    ),
    Row(
        "coteaching-cifar10-pair45",
        "Co-teaching (Han et al., NeurIPS 2018)",
        "CIFAR-10, 45% pair-flip",
        "official README 72.85; paper 72.62 vs Standard 49.50 (recalled, unchecked)",
        "`cifar10_coteaching` (the 9-layer CNN `coteaching_cnn`, Adam with the LR + beta1 "
        "schedule)",
        (Run("cifar10_coteaching", 72.85),),
    ),
    Row(
        "coteaching-cifar10-sym50",
        "Co-teaching",
        "CIFAR-10, 50% symmetric",
        "official README 74.49; paper 74.02 vs Standard 48.87 (second-hand)",
        "`cifar10_coteaching_sym50`",
        (Run("cifar10_coteaching_sym50", 74.49),),
    ),
    Row(
        "latestopping-cifar10-sym40",
        "Late Stopping (Yuan et al., ICCV 2023)",
        "CIFAR-10, 40% symmetric",
        "not in our notes (only the abstract was at hand)",
        "`cifar10_late_stopping` (N0 = 45,000, batch 32 rounds at lr 0.01, final run lr 0.02 "
        "with MultiStepLR)",
        (Run("cifar10_late_stopping", None),),
    ),
    Row(
        "latestopping-cifar100-sym40",
        "Late Stopping",
        "CIFAR-100, 40% symmetric",
        "not in our notes",
        "`cifar100_late_stopping` (ResNet-34, rate 0.975, rounds (22, 5, 0))",
        (Run("cifar100_late_stopping", None),),
    ),
    Row(
        "elr-cifar10-sym40",
        "ELR (Liu et al., NeurIPS 2020)",
        "CIFAR-10, 40% symmetric",
        "official README 89.15; 91.43 with cosine annealing",
        "`cifar10_elr` (CIFAR ResNet-34, warm restarts every 10 epochs, noise that may keep "
        "the true class)",
        (Run("cifar10_elr", 91.43),),  # the recipe is the cosine-annealing config
    ),
    Row(
        "elr-cifar100-sym40",
        "ELR",
        "CIFAR-100, 40% symmetric",
        "official README 68.28 (68.43 with cosine annealing)",
        "`cifar100_elr`",
        (Run("cifar100_elr", 68.43),),
    ),
    Row(
        "maxsup-cifar100",
        "MaxSup (Zhou et al., NeurIPS 2025) vs label smoothing",
        "clean CIFAR-100",
        "not in our notes",
        "`cifar100_maxsup`, `cifar100_label_smoothing`",
        (Run("cifar100_maxsup", None), Run("cifar100_label_smoothing", None)),
    ),
    Row(
        "maxsup-imagenet",
        "MaxSup vs label smoothing",
        "ImageNet (image folder), ResNet-50, 90 epochs",
        "not in our notes",
        "`imagefolder_maxsup`, `imagefolder_label_smoothing`",
        (Run("imagefolder_maxsup", None), Run("imagefolder_label_smoothing", None)),
    ),
    Row(
        "cifarn-cifar10n-worst",
        "CIFAR-N (Wei et al., ICLR 2022)",
        "CIFAR-10N worst labels, cross-entropy",
        "77.69 ± 1.55 (recalled; check before quoting)",
        "`cifar10n_baseline`",
        (Run("cifar10n_baseline", 77.69),),
    ),
    Row(
        "cifarn-cifar100n",
        "CIFAR-N",
        "CIFAR-100N noisy labels, cross-entropy",
        "55.50 ± 0.66 (recalled)",
        "`cifar100n_baseline`",
        (Run("cifar100n_baseline", 55.50),),
    ),
)
BY_NAME = {row.name: row for row in ROWS}


def recipe_names(cell: str) -> list[str]:
    """The recipe names in a recipe cell: the words in backticks that name a recipe."""
    from lightning_noise.recipes import list_recipes

    known = set(list_recipes())
    return [name for name in re.findall(r"`([^`]+)`", cell) if name in known]


def find_row(name: str) -> Row:
    """The row ``name``, or an error that lists the rows."""
    if name in BY_NAME:
        return BY_NAME[name]
    import difflib

    close = difflib.get_close_matches(name, BY_NAME, n=2)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise SystemExit(
        f"reproduce.py: error: unknown row {name!r}{hint} (the rows: {', '.join(BY_NAME)}; "
        "--list shows them with the paper's numbers)"
    )


def list_rows() -> str:
    """One line per row: its name, the paper and setting, and per recipe the paper's number."""
    width = max(len(row.name) for row in ROWS)
    lines = []
    for row in ROWS:
        runs = ", ".join(
            f"{run.recipe} {'-' if run.paper is None else f'{run.paper:g}'}" for run in row.runs
        )
        lines.append(f"{row.name:<{width}}  {row.paper}; {row.setting}: {runs}")
    return "\n".join(lines)


def data_overrides(recipe: Path, data_dir: Path) -> list[str]:
    """``--data.init_args.*`` overrides that read the recipe's data from ``data_dir``: its
    ``data_dir``, and a CIFAR-N labels file by its file name in ``data_dir``."""
    import yaml

    init_args = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("init_args") or {}
    out = [f"--data.init_args.data_dir={data_dir}"]
    labels = init_args.get("noisy_labels_file")
    if labels:
        out.append(f"--data.init_args.noisy_labels_file={data_dir / Path(labels).name}")
    return out


@dataclass
class Result:
    recipe: str
    paper: float | None
    ours: float  # test accuracy in percent
    note: str | None = None


def fit_and_test(run: Run, args: argparse.Namespace) -> Result:
    """Fit ``run``'s recipe through the CLI with the data and overrides of ``args``, then test
    the model as training left it."""
    from lightning_noise.callbacks import LateStopping
    from lightning_noise.cli import find_recipe, resolve_config_args
    from lightning_noise.lightning_cli import TRAINER_SUBCOMMANDS, build_cli
    from lightning_noise.types import find_callback

    recipe = find_recipe(run.recipe)
    run_dir = args.out / args.row / run.recipe
    argv = ["fit", "--config", str(recipe)]
    for config in args.trainer_config:
        argv += ["--config", config]
    argv += [
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        *data_overrides(recipe, args.data_dir),
        *args.overrides,
    ]
    no_exit = {"exit_on_error": False}
    cli = build_cli(
        resolve_config_args(argv),
        parser_kwargs={**no_exit, **{sub: dict(no_exit) for sub in TRAINER_SUBCOMMANDS}},
    )
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if "test/acc" not in metrics:
        raise RuntimeError(
            f"{run.recipe}: the test logged no test/acc (it logged {sorted(metrics)}); does its "
            "data module have a test split?"
        )
    note = None
    late = find_callback(cli.trainer, LateStopping)
    if late is not None and not late.finished:
        where = (
            "it stopped during the final run"
            if late.in_final_run
            else f"this is the model of selection round {late.round_index + 1} of "
            f"{late.num_rounds}, not the final run's"
        )
        note = f"Late Stopping's final run did not finish: {where}"
    return Result(run.recipe, run.paper, 100.0 * float(metrics["test/acc"]), note)


def report(row: Row, results: Sequence[Result], shortened: bool) -> str:
    """The lines printed at the end: per recipe the paper's number, ours and the difference."""
    width = max(len(r.recipe) for r in results)
    lines = [f"{row.name}: {row.paper}, {row.setting}"]
    lines.append(f"  paper's number: {row.number}")
    if shortened:
        lines.append("  (shortened by overrides: not the recipe's full run)")
    for r in results:
        paper = "  n/a" if r.paper is None else f"{r.paper:5.2f}"
        diff = "n/a" if r.paper is None else f"{r.ours - r.paper:+.2f}"
        lines.append(
            f"  {r.recipe:<{width}}  test acc (%): paper {paper}  ours {r.ours:5.2f}  "
            f"ours - paper {diff}"
        )
        if r.note:
            lines.append(f"    note: {r.note}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Further --key=value arguments are CLI overrides (lightning-noise fit --help).",
    )
    parser.add_argument("row", nargs="?", help="the row to run (--list shows them)")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--data-dir", type=Path, help="the folder holding the dataset")
    parser.add_argument(
        "--trainer-config",
        action="append",
        default=[],
        metavar="FILE",
        help="a config composed after the recipe, e.g. configs/trainer/gpu_bf16.yaml",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="run folders")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.csv")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad}: overrides are --key=value (one row at a time)")
    args.overrides = overrides
    if not args.list:
        if args.row is None:
            parser.error("name a row (--list shows them)")
        find_row(args.row)
        if args.data_dir is None:
            parser.error("--data-dir is required: the folder holding the row's dataset")
        if not args.data_dir.is_dir():
            parser.error(
                f"--data-dir {str(args.data_dir)!r} is not a folder: give the folder holding "
                "cifar-10-batches-py/ or cifar-100-python/ (and CIFAR-N's *_human.pt), or "
                "ImageNet's train/ and val/"
            )
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.list:
        print(list_rows())
        return []
    from lightning_noise.cli import explain_error

    row = find_row(args.row)
    results = []
    for run in row.runs:
        try:
            results.append(fit_and_test(run, args))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            message = explain_error(err)
            if message is None:
                raise
            raise SystemExit(f"reproduce.py: {run.recipe}: error: {message}") from err
    shortened = bool(args.overrides)
    print(report(row, results, shortened))
    if not args.no_record:
        from common import append_results

        suffix = " (shortened)" if shortened else ""
        rows: list[tuple[str, str, Any]] = []
        for r in results:
            case = f"{row.name}/{r.recipe}{suffix}"
            rows.append((case, "test_acc", r.ours / 100.0))
            if r.paper is not None and not math.isnan(r.paper):
                rows.append((case, "paper_test_acc", r.paper / 100.0))
        append_results("reproduce", rows)
    return results


if __name__ == "__main__":
    main()
