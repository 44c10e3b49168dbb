"""A real crash: `lightning-noise fit` killed with SIGKILL mid-epoch, then resumed.

Each test runs a recipe from the command line in a subprocess, as a user would, three ways
over: straight through; killed (``_crash.KillAt`` sends the process SIGKILL in the middle of an
epoch, so nothing after it runs) and resumed from the recipe's ``last.ckpt`` with
``--ckpt_path``, as a job supervisor restarts a preempted job. The resumed run must end with
the same weights, optimizer state, loop state and state of every callback, bit for bit on the
CPU, as the run that was never killed. Lightning's warning that a mid-epoch resume of a
non-resumable loader gives "unreliable results" must not appear.

The recipes are shrunk to seconds (test_resnet at 8 px, 40 steps) and given
``deterministic: true``; everything else (callbacks, optimizer, data, checkpoint callback)
is the recipe's own.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"
MAX_STEPS = 40
BATCH = 96  # 13 steps an epoch on one process, 7 on two: checkpoints at 10, 20 are mid-epoch


def _config(
    root: Path,
    recipe: str,
    *,
    every: int = 10,
    kills: tuple[int, ...] = (),
    extra: tuple[dict[str, Any], ...] = (),
    callback_args: dict[str, dict[str, Any]] | None = None,
    ddp: bool = False,
) -> Path:
    """The recipe's config made small, with the crash callbacks; written to ``root``."""
    config = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(
        accelerator="cpu",
        devices=2 if ddp else 1,
        max_steps=MAX_STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        deterministic=True,
    )
    if ddp:
        trainer["strategy"] = "ddp"
    callbacks = trainer["callbacks"]
    checkpoints = [c for c in callbacks if c["class_path"].endswith("Checkpoint")]
    assert len(checkpoints) == 1, f"recipe {recipe} names no checkpoint callback"
    assert checkpoints[0]["class_path"] == "lightning_noise.callbacks.ResumableCheckpoint"
    assert checkpoints[0]["init_args"]["save_last"] is True
    checkpoints[0]["init_args"].update(
        every_n_train_steps=every, every_n_epochs=None, dirpath=str(root / "ckpt")
    )
    for entry in callbacks:
        name = entry["class_path"].rsplit(".", 1)[-1]
        entry.setdefault("init_args", {}).update((callback_args or {}).get(name, {}))
    callbacks.extend(extra)
    callbacks.append(
        {"class_path": "_crash.SaveAtEnd", "init_args": {"path": str(root / "end.ckpt")}}
    )
    if kills:
        callbacks.append(
            {
                "class_path": "_crash.KillAt",
                "init_args": {"steps": list(kills), "marker_dir": str(root / "kills")},
            }
        )
    config["model"]["init_args"]["backbone"] = "test_resnet"
    config["data"]["init_args"].update(image_size=8, channels=1, batch_size=BATCH)
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *, ckpt: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_noise.cli", "fit", "--config", str(config)]
    if ckpt is not None:
        command.append(f"--ckpt_path={ckpt}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _run_until_done(config: Path, root: Path, kills: int) -> list[subprocess.CompletedProcess]:
    """Runs, and after each SIGKILL resumes from ``last.ckpt``, until the run ends."""
    runs = [_fit(config)]
    while runs[-1].returncode == -signal.SIGKILL:
        ckpt = root / "ckpt" / "last.ckpt"
        assert ckpt.is_file(), "killed before any checkpoint"
        runs.append(_fit(config, ckpt=ckpt))
    assert runs[-1].returncode == 0, runs[-1].stderr[-4000:]
    assert len(runs) == kills + 1, f"{len(runs) - 1} kills, expected {kills}"
    for resumed in runs[1:]:
        assert "unreliable" not in resumed.stderr, resumed.stderr[-4000:]
    return runs


def _load(path: Path) -> dict[str, Any]:
    # Written by the test's own runs; Lightning's checkpoints hold more than tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{where} differs")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} vs {b.keys()}"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _assert_same_end(straight: Path, resumed: Path) -> dict[str, Any]:
    a, b = _load(straight), _load(resumed)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for part in ("epoch", "state_dict", "optimizer_states", "lr_schedulers", "loops"):
        _assert_equal(a[part], b[part], part)
    # The checkpoint callback's own state names its folder and files: not compared.
    callbacks = {key for key in a["callbacks"] if not key.startswith("ResumableCheckpoint")}
    assert callbacks == {key for key in b["callbacks"] if not key.startswith("ResumableCheckpoint")}
    for key in callbacks:
        _assert_equal(a["callbacks"][key], b["callbacks"][key], key)
    return a


def _straight(tmp_path: Path, recipe: str, *, every: int = 10, **options) -> Path:
    config = _config(tmp_path / "straight", recipe, every=every, **options)
    done = _fit(config)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp_path / "straight" / "end.ckpt"


def _crashed(
    tmp_path: Path, recipe: str, *, kills: tuple[int, ...], every: int = 10, **options
) -> Path:
    config = _config(tmp_path / "crashed", recipe, every=every, kills=kills, **options)
    _run_until_done(config, tmp_path / "crashed", kills=len(kills))
    return tmp_path / "crashed" / "end.ckpt"


def _crash_and_compare(
    tmp_path: Path, recipe: str, *, kills: tuple[int, ...] = (23,), every: int = 10, **options
) -> dict[str, Any]:
    straight = _straight(tmp_path, recipe, every=every, **options)
    return _assert_same_end(
        straight, _crashed(tmp_path, recipe, kills=kills, every=every, **options)
    )


def _steps_per_epoch(devices: int = 1) -> int:
    from lightning_noise.data import DigitsDataModule

    data = DigitsDataModule(image_size=8, channels=1, batch_size=BATCH)
    data.setup("fit")
    return math.ceil(len(data.train_dataset) / devices / BATCH)


@pytest.mark.slow  # 41 s; the SAM case (killed and resumed mid-epoch) stays in the default suite
def test_baseline_recipe_survives_sigkill(tmp_path) -> None:
    """Step checkpoints that fall on an epoch's last batch (every 13 steps, 13 an epoch).

    ResumableCheckpoint saves them at the epoch's end; killed mid-epoch at steps 17 and 30,
    the run resumes from steps 13 and 26.
    """
    spe = _steps_per_epoch()
    end = _crash_and_compare(tmp_path, "digits_baseline", every=spe, kills=(spe + 4, 2 * spe + 4))
    assert any(key.startswith("TrainingDynamics") for key in end["callbacks"])


def test_sam_with_gradient_noise_survives_sigkill(tmp_path) -> None:
    noise = {"class_path": "lightning_noise.callbacks.GradientNoise", "init_args": {"eta": 0.01}}
    end = _crash_and_compare(tmp_path, "digits_sam", extra=(noise,))
    assert any(key.startswith("GradientNoise") for key in end["callbacks"])


# Slow (35 s; `make test-slow`) to keep the default suite within 15 minutes: small-loss
# selection's state is a function of the epoch and the batch's losses, resumed exactly in the
# default suite by the baseline and SAM cases here and at epoch ends by
# tests/callbacks/test_sample_selection.py::test_resume_from_checkpoint_is_exact.
@pytest.mark.slow
def test_small_loss_selection_survives_sigkill(tmp_path) -> None:
    # The selection is a function of the epoch and the batch's losses: resumed exactly when
    # the weights, the optimizer and the data order are.
    _crash_and_compare(tmp_path, "digits_small_loss")


@pytest.mark.slow  # 48 s; the SAM case stays in the default suite
def test_late_stopping_survives_sigkills_around_a_round_switch(tmp_path) -> None:
    """One run resumed from before the switch to round 2, one from inside round 2.

    The straight run says when round 1 ended (``switch``, a step at an epoch's end). The
    crashed run checkpoints every ``switch - 2`` steps: it is killed 3 steps after the switch
    and resumes from before it; then, when 40 steps leave room, killed again 2 steps after the
    next checkpoint, which lies in the middle of round 2's epoch over the kept samples only.
    """
    late = {"rate": 0.15, "rounds_per_k": [1], "warmup_epochs": 0, "final_epochs": 10}
    options: dict[str, Any] = {"callback_args": {"LateStopping": late}}
    end = _load(_straight(tmp_path, "digits_late_stopping", **options))
    state = next(v for k, v in end["callbacks"].items() if k.startswith("LateStopping"))
    assert len(state["rounds"]) == 1 and 0 < len(state["kept"]) < state["num_samples"]
    switch = int(state["rounds"][0]["epochs"]) * _steps_per_epoch()
    assert switch + 3 < MAX_STEPS, f"round 1 ended at step {switch}: too late for this test"
    every = switch - 2
    kills = (switch + 3,) if 2 * every + 2 >= MAX_STEPS else (switch + 3, 2 * every + 2)
    crashed = _crashed(tmp_path, "digits_late_stopping", kills=kills, every=every, **options)
    _assert_same_end(tmp_path / "straight" / "end.ckpt", crashed)


@pytest.mark.slow  # 51 s; single-process SIGKILL cases and the DDP tests stay in the default suite
@pytest.mark.ddp
def test_two_process_ddp_survives_sigkill(tmp_path) -> None:
    """Both ranks are killed at step 23 and the job resumes from step 20, mid-epoch."""
    assert 20 % _steps_per_epoch(devices=2) != 0
    end = _crash_and_compare(tmp_path, "digits_baseline", ddp=True)
    assert any(key.startswith("TrainingDynamics") for key in end["callbacks"])
