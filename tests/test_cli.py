"""The `lightning-noise` command end to end: recipes, linking, callbacks, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_noise.cli import build_cli, main
from lightning_noise.dynamics import TrainingDynamics

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.backbone=test_resnet",
    "--data.init_args.image_size=16",
]


def _args(tmp_path: Path, recipe: str = "digits_baseline.yaml") -> list[str]:
    return [
        "--config",
        str(RECIPES / recipe),
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        *FAST,
    ]


def test_recipe_builds_with_linked_classes_and_callbacks(tmp_path) -> None:
    cli = build_cli([*_args(tmp_path), "--data.init_args.channels=1"], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10
    assert cli.model.hparams.in_chans == 1
    assert any(isinstance(cb, TrainingDynamics) for cb in cli.trainer.callbacks)
    assert cli.datamodule.noise_rate == pytest.approx(0.4)


def test_fit_then_test_from_checkpoint(tmp_path) -> None:
    main(["fit", *_args(tmp_path)])
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    main(["test", *_args(tmp_path), f"--ckpt_path={ckpts[-1]}"])


def test_every_recipe_parses(tmp_path) -> None:
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        build_cli(
            ["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", *FAST], run=False
        )


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("--data.init_args.noise_rate=1.5", "1.5"),
        ("--model.init_args.backbone=resnet181", "resnet181"),
        ("--data.init_args.noise=gaussian", "gaussian"),
    ],
)
def test_bad_config_values_fail_clearly(tmp_path, override, match, capsys) -> None:
    with pytest.raises((ValueError, SystemExit)) as info:
        build_cli([*_args(tmp_path), override], run=False)
    text = str(info.value) + capsys.readouterr().err
    assert match in text


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_noise.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--data" in out.stdout and "--model" in out.stdout
