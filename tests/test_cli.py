"""The `lightning-noise` command end to end: recipes, linking, callbacks, errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_noise.cli import (
    LightningNoiseCLI,
    build_cli,
    explain_error,
    find_recipe,
    list_recipes,
    main,
    resolve_config_args,
)
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.recipes import shipped_root
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
        with pytest.raises(SystemExit, match="is not a Lightning checkpoint") as info:
            main(["fit", *_args(tmp_path), f"--ckpt_path={bad}"])
        assert name in str(info.value) and "earlier checkpoint" in str(info.value)
        assert "Re-running" not in str(info.value)
        with pytest.raises(ValueError, match="is not a Lightning checkpoint"):  # the library's
            build_cli(["fit", *_args(tmp_path), f"--ckpt_path={bad}"])
    with pytest.raises(SystemExit, match=r"nowhere\.ckpt' not found"):
        main(["fit", *_args(tmp_path), f"--ckpt_path={tmp_path / 'nowhere.ckpt'}"])
    main(["fit", *_args(tmp_path), "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    newest = max(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest != last
    resumed = torch.load(newest, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 4  # 2 batches an epoch


def test_a_distributed_checkpoint_folder_is_accepted_and_any_other_folder_refused(tmp_path):
    """Sharded runs save a folder (torch.distributed.checkpoint): the check lets it through to
    the strategy; a folder without its metadata is refused naming the fix. (Resuming from
    such a folder end to end: tests/test_fsdp.py, the slow CLI test.)"""
    from lightning_noise.lightning_cli import check_checkpoint_file

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder but not a distributed checkpoint"):
        check_checkpoint_file(folder)
    (folder / ".metadata").write_bytes(b"")
    check_checkpoint_file(folder)  # accepted: the strategy reads it


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


#: Configuration errors: the override, then what the one message must say (the option, the
#: bad value, what is allowed or the fix).
BAD_VALUES = {
    "--data.noise_rate=1.5": [
        "--data",
        "no option 'noise_rate'",
        "did you mean noise",
        "--data.help",
    ],
    "--data.noise.rate=1.5": ["--data (lightning_noise.data.DigitsDataModule)", "[0, 1)", "1.5"],
    "--data.noise.kind=gaussian": ["--data.noise.kind", "'gaussian'", "symmetric, pair"],
    "--model.init_args.backbone=resnet181": ["--model", "'resnet181'", "did you mean", "resnet18"],
    "--trainer.max_epochs=ten": ["--trainer.max_epochs", "'ten'", "expected int"],
    "--trainer.max_epoch_count=3": ["unrecognized arguments: --trainer.max_epoch_count=3"],
}


def _error(argv: list[str], capsys) -> str:
    """The message main() exits with; it must not be a traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, str), info.value.code  # a message: exit status 1
    message = info.value.code
    assert message.startswith("lightning-noise: error: ")
    assert "Traceback" not in message + capsys.readouterr().err
    return message


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_bad_config_values_fail_with_one_message(tmp_path, override, capsys) -> None:
    message = _error(["fit", *_args(tmp_path), override], capsys)
    for part in BAD_VALUES[override]:
        assert part in message, (part, message)
    assert len(message.splitlines()) == 2 and "--debug" in message  # how to see the traceback


def test_errors_of_every_command_are_one_message(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    lr = "--model.init_args.optimizer.init_args.lr=-1"  # torch's SGD refuses it in fit
    message = _error(
        ["run", "digits_baseline", *FAST[:3], f"--trainer.default_root_dir={tmp_path}", lr], capsys
    )
    assert "torch.optim.sgd.SGD: Invalid learning rate: -1" in message
    message = _error(["fit", "--config", "configs/trainer/nothing.yaml"], capsys)
    assert "'configs/trainer/nothing.yaml' not found" in message and str(tmp_path) in message
    message = _error(["fit", *_args(tmp_path), "--ckpt_path=missing.ckpt"], capsys)
    assert "'missing.ckpt' not found" in message and "last.ckpt" in message
    message = _error(["fit", "--trainer.max_epochs=1"], capsys)
    assert "required: fit.data, fit.model" in message and "lightning-noise run" in message
    message = _error(["fitt"], capsys)
    assert "unknown command 'fitt'; did you mean fit?" in message
    with pytest.raises(SystemExit, match="no recipe named 'digits_sma'; did you mean digits_sam"):
        main(["run", "digits_sma"])
    with pytest.raises(SystemExit, match=r"lightning-noise plot: error: .*nowhere"):
        main(["plot", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no sweep file or sweep named 'sam_rh'"):
        main(["sweep", "sam_rh"])
    with pytest.raises(SystemExit) as info:  # argparse's own error: usage and exit status 2
        main(["recipes", "--copy"])
    assert info.value.code == 2


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    """``--debug`` (or ``LIGHTNING_NOISE_DEBUG=1``) lets the original error through."""
    bad = [*_args(tmp_path), "--model.init_args.backbone=resnet181"]
    with pytest.raises(ValueError, match="timm does not know a backbone named 'resnet181'"):
        main(["fit", *bad, "--debug"])
    monkeypatch.setenv("LIGHTNING_NOISE_DEBUG", "1")
    with pytest.raises(ValueError, match="Does not validate"):
        main(["fit", *bad])
    with pytest.raises(argparse.ArgumentError, match="gaussian"):
        main(["fit", *_args(tmp_path), "--data.noise.kind=gaussian"])


def test_a_bug_keeps_its_traceback() -> None:
    """Only configuration and input errors become one message: an error raised outside our
    code and outside the config's classes is a crash to report, with its traceback."""
    try:
        {}["key"]
    except KeyError as err:
        assert explain_error(err) is None
    try:
        raise ValueError("deep inside torch")
    except ValueError as err:
        assert explain_error(err) is None
    try:
        find_recipe("digits_sam").read_text().index("not in the recipe")
    except ValueError as err:  # str.index, called from here: not our package
        assert explain_error(err) is None


BAD_KIND = "--data.noise.kind=gaussian"


def test_console_script_one_message_and_no_wiring_warning(tmp_path) -> None:
    """The installed command as a user runs it: a bad value is one message on stderr, exit
    status 1, no traceback and no warning about how the command calls LightningCLI."""
    out = subprocess.run(
        [sys.executable, "-m", "lightning_noise.cli", "fit", *_args(tmp_path), BAD_KIND],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "LightningCLI's args parameter" not in out.stderr
    assert "--data.noise.kind: got 'gaussian'; allowed: symmetric" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr  # e.g. "Seed set to 0"


def test_help_lists_every_command_and_each_has_its_own(capsys) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "run", "recipes", "sweep", "plot", "demo"):
        (line,) = [x for x in out.splitlines() if x.split()[:1] == [name]]
        assert len(line.split()) > 3, line  # the command and its one line
    for name in ("run", "recipes", "sweep", "plot", "demo", "validate"):
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code in (0, None), name
        assert "usage:" in capsys.readouterr().out, name
    with pytest.raises(SystemExit) as info:  # no command: the help, on stderr, status 2
        main([])
    assert info.value.code == 2 and "commands:" in capsys.readouterr().err
    main(["--version"])
    assert capsys.readouterr().out.startswith("lightning-noise 0.")


def test_help_recipes_and_plot_import_neither_torch_nor_lightning() -> None:
    code = (
        "import sys\n"
        "from lightning_noise.cli import main\n"
        "for argv in (['--help'], ['recipes'], ['recipes', '--help'], ['run', '--help'],"
        " ['plot', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code in (0, None), (argv, stop.code)\n"
        "heavy = ('torch', 'lightning', 'matplotlib', 'timm', 'numpy', 'jsonargparse')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "digits_sam" in out.stdout  # the recipes were listed
    assert "LOADED []" in out.stdout, out.stdout[-300:]


def test_configs_and_recipes_resolve_from_any_directory(tmp_path, monkeypatch, capsys) -> None:
    """A relative configs/... or recipes/... path missing from the working directory is read
    from the shipped tree: --config, a callback preset appended with +=, a recipe path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                "recipes/digits_sam.yaml",
                "--config=configs/trainer/cpu_quick.yaml",
                "--trainer.callbacks+=configs/callbacks/gradient_noise.yaml",
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["limit_train_batches"] == 10  # cpu_quick
    callbacks = [cb["class_path"] for cb in config["trainer"]["callbacks"]]
    assert callbacks[-2:] == [
        "lightning_noise.callbacks.SAM",
        "lightning_noise.callbacks.GradientNoise",
    ]
    # The working directory comes first: a local configs/ file of the same name wins.
    (tmp_path / "configs" / "trainer").mkdir(parents=True)
    (tmp_path / "configs" / "trainer" / "cpu_quick.yaml").write_text("trainer:\n  max_epochs: 7\n")
    args = resolve_config_args(
        ["--config", "configs/trainer/cpu_quick.yaml", "--x=configs/data/digits_sym20.yaml"]
    )
    assert args[1] == "configs/trainer/cpu_quick.yaml"
    assert (
        Path(args[2].split("=", 1)[1]) == shipped_root() / "configs" / "data" / "digits_sym20.yaml"
    )


def test_run_and_sweep_resolve_names_and_local_recipes(tmp_path, monkeypatch, capsys) -> None:
    import lightning_noise.sweep

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(lightning_noise.sweep, "main", seen.append)
    main(["sweep", "configs/sweeps/sam_rho.yaml", "--count", "1"])
    assert seen[-1] == [str(shipped_root() / "configs" / "sweeps" / "sam_rho.yaml"), "--count", "1"]
    main(["sweep", "sam_rho"])  # a name is the sweep command's to look up
    assert seen[-1] == ["sam_rho"]
    # ./recipes adds to the shipped recipes and replaces one of the same name.
    (tmp_path / "recipes").mkdir()
    mine = tmp_path / "recipes" / "digits_sam.yaml"
    mine.write_text("# My SAM. More.\nseed_everything: 1\n")
    assert find_recipe("digits_sam") == mine
    assert find_recipe("digits_baseline") == shipped_root() / "recipes" / "digits_baseline.yaml"
    assert find_recipe("recipes/digits_gce.yaml") == shipped_root() / "recipes" / "digits_gce.yaml"
    main(["recipes"])
    out = capsys.readouterr().out
    assert "digits_sam  " in out and "My SAM." in out and "from ./recipes" in out


def test_recipes_copy_writes_an_editable_copy(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    main(["recipes", "--copy", "digits_sam"])
    shipped = (shipped_root() / "recipes" / "digits_sam.yaml").read_text()
    assert (tmp_path / "digits_sam.yaml").read_text() == shipped
    assert "lightning-noise fit --config digits_sam.yaml" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists: give another destination, or add --force"):
        main(["recipes", "--copy", "digits_sam"])
    (tmp_path / "digits_sam.yaml").write_text("edited")
    main(["recipes", "--copy", "digits_sam", "--force"])
    assert (tmp_path / "digits_sam.yaml").read_text() == shipped
    (tmp_path / "mine").mkdir()
    main(["recipes", "--copy", "digits_gce", "mine"])
    assert (tmp_path / "mine" / "digits_gce.yaml").is_file()
    with pytest.raises(SystemExit, match="no recipe named 'nope'"):
        main(["recipes", "--copy", "nope"])
    with pytest.raises(SystemExit) as info:
        main(["recipes", "mine"])  # a destination without --copy
    assert info.value.code == 2


def test_shipped_root_prefers_the_wheel_layout(tmp_path, monkeypatch) -> None:
    """Installed from a wheel, the recipes and configs are lightning_noise/_packaged/."""
    import lightning_noise.recipes as where

    monkeypatch.chdir(tmp_path)
    packaged = tmp_path / "_packaged"
    for folder in ("recipes", "configs"):
        (packaged / folder).mkdir(parents=True)
    (packaged / "recipes" / "only_here.yaml").write_text("# Only in the wheel.\n")
    monkeypatch.setattr(where, "_PACKAGED", packaged)
    assert shipped_root() == packaged
    assert list(list_recipes()) == ["only_here"]
    monkeypatch.setattr(where, "_PACKAGED", tmp_path / "absent")
    monkeypatch.setattr(where, "_SOURCE", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        shipped_root()


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_noise.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--data" in out.stdout and "--model" in out.stdout
    assert "LightningCLI's args parameter" not in out.stderr


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
