"""The wheel as a user installs it: recipes, configs and sweeps inside, runnable from anywhere.

``test_wheel_ships_every_recipe_and_config`` builds the wheel (a few seconds) and checks its
file list; the slow ``test_installed_wheel_runs_a_recipe_from_an_empty_directory`` installs it
into a fresh virtual environment, away from the source tree, and trains a recipe for two
steps from an empty folder (``make test-wheel``, run by CI).

No internet: the wheel is built with the build tools of this environment
(``--no-build-isolation``) and installed without its dependencies; the fresh environment
reaches them through a ``.pth`` file naming this environment's ``site-packages``. Python does
not read the ``.pth`` files of a folder named that way, so this environment's editable install
of lightning-noise stays invisible there: only the wheel's copy can be imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from: the files a source distribution holds.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "lightning_noise", "recipes", "configs")
SHIPPED = ("recipes", "configs")
PIP = (sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check")


def _shipped_files() -> set[str]:
    return {
        f"lightning_noise/_packaged/{path.relative_to(ROOT).as_posix()}"
        for folder in SHIPPED
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the working tree stays untouched: no
    build/ or egg-info written into it)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [*PIP, "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-w", work, source],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = work.glob("lightning_noise-*.whl")
    return built


def test_wheel_ships_every_recipe_and_config(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = _shipped_files()
    assert len(shipped) > 40  # recipes, callback/loss/data/trainer presets, sweeps
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert "lightning_noise/recipes.py" in names and "lightning_noise/cli.py" in names
    # Nothing of the working tree's tests or benchmarks rides along.
    assert not {n for n in names if n.startswith(("tests/", "benchmarks/"))}


def _fresh_venv(path: Path, wheel: Path) -> Path:
    """A virtual environment holding only the wheel; its dependencies come from this one."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    # pip of this environment installs into the new one; the .pth is written afterwards, so
    # pip never sees this environment's own lightning-noise while installing.
    subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-index", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


@pytest.mark.slow
@pytest.mark.wheel
def test_installed_wheel_runs_a_recipe_from_an_empty_directory(wheel, tmp_path) -> None:
    bin_dir = _fresh_venv(tmp_path / "venv", wheel)
    empty = tmp_path / "empty"
    empty.mkdir()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / "lightning-noise"), *args],
            cwd=empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import lightning_noise; print(lightning_noise.__file__)"],
        cwd=empty,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel's copy, not the source

    listed = command("recipes")
    assert listed.returncode == 0, listed.stderr
    assert "digits_sam " in listed.stdout and "_packaged" in listed.stdout

    copied = command("recipes", "--copy", "digits_baseline")
    assert copied.returncode == 0, copied.stderr
    shipped = ROOT / "recipes" / "digits_baseline.yaml"
    assert (empty / "digits_baseline.yaml").read_text() == shipped.read_text()

    run = command(
        "run",
        "digits_baseline",
        "--config",
        "configs/trainer/cpu_quick.yaml",  # relative to nothing here: read from the wheel
        "--trainer.callbacks+=configs/callbacks/sam.yaml",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.init_args.backbone=test_resnet",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (last,) = (empty / "runs" / "digits_baseline").rglob("last.ckpt")
    import torch

    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    (config,) = (empty / "runs" / "digits_baseline").rglob("config.yaml")
    config = yaml.safe_load(config.read_text())
    assert config["trainer"]["accelerator"] == "cpu"  # the shipped trainer preset
    callbacks = [cb["class_path"] for cb in config["trainer"]["callbacks"]]
    assert "lightning_noise.callbacks.SAM" in callbacks  # the shipped callback preset
    assert "LightningCLI's args parameter" not in run.stderr
    assert "Traceback" not in run.stderr

    missing = command("fit", "--config", "configs/trainer/nothing.yaml")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "configs/trainer/nothing.yaml" in missing.stderr and "not found" in missing.stderr
