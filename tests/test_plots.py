"""``lightning-noise plot``: the figures' numbers are the run's, and the PNGs show them.

The run folder is a real resumed run (2 epochs, then 2 more from ``last.ckpt``, logged in two
``version_N`` folders), so the curve is checked to read both.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from lightning_noise import plots
from lightning_noise.cli import main
from lightning_noise.dynamics.callback import EXPORT_FILE
from lightning_noise.plots import (
    distinct_colours,
    fkl_histogram,
    load_export,
    loss_distributions,
    memorisation_curve,
    plot_run,
    read_epoch_metrics,
    read_run_metrics,
    robustness_chart,
    run_metrics_files,
)

ROOT = Path(__file__).resolve().parents[1]


def _check_png(path: Path) -> None:
    """A decodable PNG of a real figure: the expected size, and not a blank canvas."""
    image = mpimg.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert float(np.std(image[..., :3])) > 0.05  # lines, bars and text, not one colour


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of 4 epochs, resumed after the 2nd: its metrics sit in version_0 and version_1."""
    root = tmp_path_factory.mktemp("run")
    args = [
        "run",
        "digits_baseline",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--model.init_args.backbone=test_resnet",
        "--data.init_args.image_size=8",
    ]
    main([*args, "--trainer.max_epochs=2"])
    (last,) = root.rglob("last.ckpt")
    main([*args, "--trainer.max_epochs=4", f"--ckpt_path={last}"])
    return root


def test_plot_command_writes_the_run_figures(run_dir, capsys) -> None:
    main(["plot", str(run_dir)])
    out = capsys.readouterr().out
    for name in ("memorisation.png", "loss_distributions.png", "fkl_histogram.png"):
        png = run_dir / "plots" / name
        assert str(png) in out
        _check_png(png)


def test_figures_draw_the_runs_numbers(run_dir, tmp_path) -> None:
    files = run_metrics_files(run_dir)
    assert [f.parent.name for f in files] == ["version_0", "version_1"]
    before, after = (read_epoch_metrics(f) for f in files)
    assert sorted(before["train/acc_clean_labels"]) == [0, 1]  # the epochs before the resume
    assert sorted(after["train/acc_clean_labels"]) == [2, 3]  # logged with their own epochs
    _, curve = memorisation_curve(files, tmp_path / "m.png")
    expected = {**before["train/acc_clean_labels"], **after["train/acc_clean_labels"]}
    assert curve["train/acc_clean_labels"] == expected
    assert sorted(curve["train/acc_noisy_labels"]) == [0, 1, 2, 3]

    export = torch.load(next(run_dir.rglob(EXPORT_FILE)), weights_only=True)
    mask = export["noise_mask"]
    assert mask is not None and 0.3 < mask.float().mean() < 0.5  # the recipe's 40% noise
    _, losses = loss_distributions(export, tmp_path / "l.png")
    assert len(losses["clean labels"]) + len(losses["noisy labels"]) == mask.numel()
    assert sorted(losses["noisy labels"]) == sorted(export["last_loss"][mask].tolist())
    _, counts = fkl_histogram(export, tmp_path / "f.png")
    fkl = export["first_learned_epoch"]
    assert counts["noisy labels"][-1] == int((fkl[mask] < 0).sum())  # the "never" bar
    assert sum(counts["clean labels"]) == int((~mask).sum())


def test_robustness_chart_from_the_benchmark_results(tmp_path) -> None:
    _, table = robustness_chart(ROOT / "benchmarks" / "results.csv", tmp_path / "r.png")
    assert table["sym-40"]["CE"][0] == pytest.approx(0.563603)
    assert table["sym-40"]["Co-teaching"][0] > table["sym-40"]["CE"][0]
    _check_png(tmp_path / "r.png")
    main(["plot", str(ROOT / "benchmarks" / "results.csv"), "--out", str(tmp_path)])
    _check_png(tmp_path / "robustness.png")


def test_plot_fails_clearly_on_an_empty_folder(tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"found neither metrics\.csv"):
        main(["plot", str(tmp_path)])


def test_plot_on_a_missing_path_is_one_line(tmp_path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as err:
        main(["plot", str(missing)])
    message = str(err.value.code)
    assert message.startswith("lightning-noise plot: error: ") and "\n" not in message
    assert str(missing) in message and "does not exist" in message
    assert err.value.__suppress_context__  # no traceback of the FileNotFoundError under it


def _export(n: int = 12, epochs: int = 3) -> dict:
    mask = torch.arange(n) % 3 == 0
    history = torch.ones(n, epochs, dtype=torch.bool)
    history[mask] = False
    return {
        "k": 2,
        "history": history,
        "last_loss": torch.linspace(0.1, 2.0, n),
        "first_learned_epoch": torch.where(mask, -1, 1),
        "aum": torch.zeros(n),
        "noise_mask": mask,
    }


class _RunsCode:
    """Unpickling this calls ``print``: a stand-in for code hidden in a file."""

    def __reduce__(self):
        return (print, ("code from the file ran",))


def test_plot_loads_dynamics_with_weights_only(tmp_path, capsys) -> None:
    good = tmp_path / "good"
    good.mkdir()
    torch.save(_export(), good / EXPORT_FILE)
    written = plot_run(good)
    assert set(written) == {"loss", "fkl"}
    _check_png(written["fkl"])

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({**_export(), "extra": _RunsCode()}, bad / EXPORT_FILE)
    with pytest.raises(ValueError) as err:
        plot_run(bad)
    assert "code from the file ran" not in capsys.readouterr().out  # loading ran no code
    message = str(err.value)
    assert repr(str(bad / EXPORT_FILE)) in message and "GLOBAL print" in message
    assert "weights_only" not in message  # never the advice to load it unsafely
    assert err.value.__context__ is None and err.value.__cause__ is None


@pytest.mark.parametrize("content", ["random", "truncated", "not a dict"])
def test_plot_on_a_bad_dynamics_file_names_it(tmp_path, content) -> None:
    path = tmp_path / EXPORT_FILE
    if content == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 999, dtype=np.uint8).tobytes())
    elif content == "truncated":
        torch.save(_export(), path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save([1, 2], path)
    with pytest.raises(SystemExit) as err:
        main(["plot", str(tmp_path)])
    message = str(err.value.code)
    assert repr(str(path)) in message and "is not a TrainingDynamics export" in message
    assert "weights_only" not in message
    with pytest.raises(ValueError, match="is not a TrainingDynamics export"):
        load_export(path)


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions save, drawn (so their extents are known) and kept."""
    kept = []
    save = plots._save

    def keep(plt, fig, out):
        fig.canvas.draw()
        kept.append(fig)
        save(plt, fig, out)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _legend_outside(ax) -> bool:
    legend = ax.get_legend()
    return legend is not None and not legend.get_window_extent().overlaps(ax.get_window_extent())


@pytest.mark.parametrize("n", [1, 2, 10, 11, 13, 20, 21, 40])
def test_distinct_colours_differ_for_any_number_of_series(n) -> None:
    colours = np.array(distinct_colours(n))
    assert colours.shape == (n, 3)
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(n)
    assert gaps.min() > 0.05  # no two series share (or nearly share) a colour
    with pytest.raises(ValueError, match="n must be >= 0"):
        distinct_colours(-1)


def test_robustness_chart_gives_every_method_its_colour(tmp_path, figures) -> None:
    from matplotlib.container import BarContainer

    _, table = robustness_chart(ROOT / "benchmarks" / "results.csv", tmp_path / "r.png")
    (ax,) = figures[0].axes
    bars = {
        c.get_label(): c.patches[0].get_facecolor()
        for c in ax.containers
        if isinstance(c, BarContainer)  # not the error bars
    }
    methods = {m for by_method in table.values() for m in by_method}
    assert set(bars) == methods and len(methods) > 10  # more methods than the default cycle
    assert bars["CE"] != bars["SAM"]  # the 1st and 11th: the same blue before
    assert len(set(bars.values())) == len(bars)
    assert _legend_outside(ax)


def _write_metrics(folder: Path, rows: list[tuple[int, int, float]]) -> Path:
    """A CSVLogger-like metrics.csv with (epoch, step, train/acc_clean_labels) rows."""
    folder.mkdir(parents=True)
    lines = ["epoch,step,train/acc_clean_labels,train/loss"]
    lines += [f"{e},{s},{v},0.5" for e, s, v in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder / "metrics.csv"


def test_resumed_run_is_read_across_versions_by_epoch(tmp_path, figures) -> None:
    logs = tmp_path / "run" / "lightning_logs"
    # Killed during epoch 3 (its epoch-3 value is partial), resumed from the end of epoch 2.
    _write_metrics(logs / "version_0", [(0, 9, 0.1), (1, 19, 0.2), (2, 29, 0.3), (3, 34, 0.0)])
    _write_metrics(logs / "version_1", [(3, 39, 0.4), (4, 49, 0.5)])
    # version_10 sorts after version_9 by number, not as text.
    for v in range(2, 10):
        _write_metrics(logs / f"version_{v}", [(5 + v, 50 + 10 * v, 0.5 + v / 100)])
    files = run_metrics_files(tmp_path / "run")
    assert [f.parent.name for f in files] == [f"version_{v}" for v in range(10)]
    table, used = read_run_metrics(files[:2])
    assert table["train/acc_clean_labels"] == {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}
    assert used == files[:2]

    # A new run of the same recipe (it starts at epoch 0 again) replaces the earlier ones.
    _write_metrics(logs / "version_10", [(0, 9, 0.9)])
    files = run_metrics_files(tmp_path / "run")
    table, used = read_run_metrics(files)
    assert table["train/acc_clean_labels"] == {0: 0.9} and used == files[-1:]

    assert set(plot_run(tmp_path / "run")) == {"memorisation"}
    ax = figures[-1].axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1] and list(line.get_ydata()) == [0.9]


def test_memorisation_curve_of_one_epoch_shows_points_on_whole_epochs(tmp_path, figures) -> None:
    csv_path = _write_metrics(tmp_path / "version_0", [(0, 3, 0.7)])
    memorisation_curve(csv_path, tmp_path / "m.png")
    (ax,) = figures[0].axes
    (line,) = ax.get_lines()
    assert line.get_marker() not in (None, "None", "")  # one point is visible
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert _legend_outside(ax)


def test_plot_module_imports_neither_torch_nor_matplotlib() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_noise.plots, lightning_noise.demo, lightning_noise.sweep; "
        "print(sorted(m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert plots.EXPORT_FILE == EXPORT_FILE  # plots names the file without importing it
