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
    loss_distributions,
    memorisation_curve,
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

    export = torch.load(next(run_dir.rglob(EXPORT_FILE)), weights_only=False)
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
    with pytest.raises(ValueError, match=r"found neither metrics\.csv"):
        main(["plot", str(tmp_path)])
