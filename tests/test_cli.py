"""The `lightning-noise` command end to end: recipes, linking, callbacks, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_noise.cli import LightningNoiseCLI, build_cli, main
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.types import find_callback

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
    assert cli.datamodule.noise.rate == pytest.approx(0.4)


def test_fit_then_test_from_checkpoint(tmp_path) -> None:
    main(["fit", *_args(tmp_path)])
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    main(["test", *_args(tmp_path), f"--ckpt_path={ckpts[-1]}"])


def test_fit_resumes_from_last_and_refuses_a_damaged_checkpoint(tmp_path) -> None:
    """A recipe's checkpoint callback keeps last.ckpt; a cut-short or random file is refused.

    The refusal names the file and the fix, never torch's advice to load with
    ``weights_only=False``; a good checkpoint resumes (``fit`` on from where it stopped).
    """
    main(["fit", *_args(tmp_path)])
    (last,) = tmp_path.rglob("last.ckpt")
    good = last.read_bytes()
    damaged = {"random.ckpt": bytes(range(256)) * 64, "cut.ckpt": good[: len(good) // 2]}
    for name, data in damaged.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="is not a Lightning checkpoint") as info:
            main(["fit", *_args(tmp_path), f"--ckpt_path={bad}"])
        assert name in str(info.value) and "earlier checkpoint" in str(info.value)
        assert "Re-running" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.ckpt"):
        main(["fit", *_args(tmp_path), f"--ckpt_path={tmp_path / 'nowhere.ckpt'}"])
    main(["fit", *_args(tmp_path), "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    newest = max(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest != last
    resumed = torch.load(newest, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 4  # 2 batches an epoch


def test_every_recipe_parses() -> None:
    """Each recipe is a valid config for the CLI (every value type-checked)."""

    class ParseOnly(LightningNoiseCLI):
        def instantiate_classes(self) -> None:  # CIFAR/ImageFolder files are absent here
            pass

    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        cli = build_cli(["--config", str(recipe)], run=False, cli_class=ParseOnly)
        assert cli.config["model"]["class_path"].startswith("lightning_noise.")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("--data.init_args.noise.rate=1.5", "1.5"),
        ("--model.init_args.backbone=resnet181", "resnet181"),
        ("--data.init_args.noise.kind=gaussian", "gaussian"),
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


def test_cifar10n_recipe_end_to_end(tmp_path) -> None:
    """The CIFAR-10N recipe trains from the CLI on small files in the real formats."""
    import numpy as np
    import torch
    from _formats import N_TRAIN_10, train_labels_10, write_cifar10

    write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    clean = train_labels_10()
    worse = np.where(np.arange(N_TRAIN_10) % 4 == 0, (clean + 1) % 10, clean)
    torch.save({"clean_label": clean, "worse_label": worse}, tmp_path / "data" / "h.pt")
    args = [
        "--config",
        str(RECIPES / "cifar10n_baseline.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.data_dir={tmp_path / 'data'}",
        f"--data.init_args.noisy_labels_file={tmp_path / 'data' / 'h.pt'}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=25",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.backbone=test_resnet",
        "--model.init_args.backbone_kwargs=null",  # the recipe's cifar_stem is for resnet18
    ]
    cli = build_cli(["fit", *args])
    assert cli.datamodule.noise.kind == "given"
    assert torch.equal(cli.datamodule.noise_mask, torch.as_tensor(worse != clean))
    assert cli.model.noise_mask.sum() == (worse != clean).sum()
    store = find_callback(cli.trainer, TrainingDynamics).store
    assert store.num_samples == N_TRAIN_10 and bool(store.seen.all())


def test_imagefolder_recipe_end_to_end(tmp_path) -> None:
    from _formats import write_images

    write_images(tmp_path / "imgs" / "train", 6)
    write_images(tmp_path / "imgs" / "val", 2)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPES / "imagefolder_baseline.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.init_args.data_dir={tmp_path / 'imgs'}",
            "--data.init_args.image_size=32",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=6",
            "--data.init_args.noise.rate=0.3",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet",
        ]
    )
    assert cli.model.hparams.num_classes == 3
    assert "val/acc" in cli.trainer.callback_metrics


def test_missing_cifar_directory_fails_clearly_from_the_cli(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_cli(
            [
                "fit",
                "--config",
                str(RECIPES / "cifar10n_baseline.yaml"),
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--data.init_args.data_dir={tmp_path / 'nothing'}",
                "--trainer.max_epochs=1",
            ]
        )
