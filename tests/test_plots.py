"""``lightning-noise plot``: the figures' numbers are the run's, and the PNGs show them."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from lightning_noise.cli import main
from lightning_noise.dynamics.callback import EXPORT_FILE
from lightning_noise.plots import (
    fkl_histogram,
    load_export,
    loss_distributions,
    memorisation_curve,
    plot_run,
    read_epoch_metrics,
    robustness_chart,
)

ROOT = Path(__file__).resolve().parents[1]


def _check_png(path: Path) -> None:
    """A decodable PNG of a real figure: the expected size, and not a blank canvas."""
    image = mpimg.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert float(np.std(image[..., :3])) > 0.05  # lines, bars and text, not one colour


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    main(
        [
            "run",
            "digits_baseline",
            "--trainer.max_epochs=4",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--model.init_args.backbone=test_resnet",
            "--data.init_args.image_size=8",
        ]
    )
    return root


def test_plot_command_writes_the_run_figures(run_dir, capsys) -> None:
    main(["plot", str(run_dir)])
    out = capsys.readouterr().out
    for name in ("memorisation.png", "loss_distributions.png", "fkl_histogram.png"):
        png = run_dir / "plots" / name
        assert str(png) in out
        _check_png(png)


def test_figures_draw_the_runs_numbers(run_dir, tmp_path) -> None:
    metrics_csv = next(run_dir.rglob("metrics.csv"))
    _, curve = memorisation_curve(metrics_csv, tmp_path / "m.png")
    table = read_epoch_metrics(metrics_csv)
    assert len(curve["train/acc_noisy_labels"]) == 4
    assert curve["train/acc_clean_labels"] == [table["train/acc_clean_labels"][e] for e in range(4)]

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
