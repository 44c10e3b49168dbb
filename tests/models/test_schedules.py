"""The papers' LR schedules, per epoch, against the official code's formulas: Co-teaching's
Adam schedule (lightning_noise/models/schedules.py), and the schedules the recipes configure
(ELR's warm restarts, Late Stopping's rounds and final run), built from the recipes' YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_noise.callbacks import LateStopping
from lightning_noise.cli import build_cli, find_recipe
from lightning_noise.models.schedules import LinearDecayWithBeta1Switch
from lightning_noise.types import find_callback

ROOT = Path(__file__).resolve().parents[2]


def official_coteaching_plans(lr: float, n_epoch: int, epoch_decay_start: int):
    """``alpha_plan`` and ``beta1_plan`` as the official Co-teaching main.py builds them."""
    mom1, mom2 = 0.9, 0.1
    alpha_plan = [lr] * n_epoch
    beta1_plan = [mom1] * n_epoch
    for i in range(epoch_decay_start, n_epoch):
        alpha_plan[i] = float(n_epoch - i) / (n_epoch - epoch_decay_start) * lr
        beta1_plan[i] = mom2
    return alpha_plan, beta1_plan


def run_epochs(optimizer, scheduler, epochs: int) -> tuple[list[float], list[tuple]]:
    """The LR and betas each epoch trains with, stepping once per epoch as Lightning does."""
    lrs, betas = [], []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(tuple(optimizer.param_groups[0].get("betas", ())))
        optimizer.step()
        scheduler.step()
    return lrs, betas


def adam(lr: float = 0.001) -> torch.optim.Adam:
    return torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=lr)


@pytest.mark.parametrize(("n_epoch", "decay_start"), [(200, 80), (200, 100), (7, 3)])
def test_coteaching_schedule_is_the_official_plan(n_epoch, decay_start) -> None:
    alpha, beta1 = official_coteaching_plans(0.001, n_epoch, decay_start)
    # Offset 1 and n_epoch - 1 epochs: the official loop (range(1, n_epoch)), value for value.
    opt = adam()
    sched = LinearDecayWithBeta1Switch(
        opt, total_epochs=n_epoch, decay_start=decay_start, epoch_offset=1
    )
    lrs, betas = run_epochs(opt, sched, n_epoch - 1)
    assert lrs == alpha[1:]
    assert betas == [(b, 0.999) for b in beta1[1:]]
    # Offset 0 (the default): the same plan from index 0, one epoch later than the official run.
    opt = adam()
    sched = LinearDecayWithBeta1Switch(opt, total_epochs=n_epoch, decay_start=decay_start)
    lrs, betas = run_epochs(opt, sched, n_epoch + 2)
    assert lrs[:n_epoch] == alpha and lrs[n_epoch:] == [0.0, 0.0]  # clamped past the plan
    assert [b[0] for b in betas[:n_epoch]] == beta1


def test_coteaching_schedule_resumes_and_refuses_bad_input() -> None:
    opt = adam()
    sched = LinearDecayWithBeta1Switch(opt, total_epochs=10, decay_start=4)
    run_epochs(opt, sched, 6)
    state, opt_state = sched.state_dict(), opt.state_dict()
    expected, _ = run_epochs(opt, sched, 4)
    opt2 = adam()
    sched2 = LinearDecayWithBeta1Switch(opt2, total_epochs=10, decay_start=4)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    resumed, betas = run_epochs(opt2, sched2, 4)
    assert resumed == expected and betas[0] == (0.1, 0.999)
    with pytest.raises(ValueError, match="has no `betas`"):
        LinearDecayWithBeta1Switch(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(ValueError, match="decay_start must be below"):
        LinearDecayWithBeta1Switch(adam(), total_epochs=10, decay_start=10)
    with pytest.raises(ValueError, match="beta1_after"):
        LinearDecayWithBeta1Switch(adam(), beta1_after=1.0)


# ------------------------------------------------------------------- the recipes' schedules
def recipe_cli(name: str, tmp_path: Path, *extra: str):
    """The recipe's objects, built by the CLI without training (no data is read)."""
    return build_cli(
        [
            "--config",
            str(find_recipe(name)),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.init_args.data_dir={tmp_path}",
            *extra,
        ],
        run=False,
    )


def optimizer_and_scheduler(configured):
    if isinstance(configured, torch.optim.Optimizer):
        return configured, None
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


@pytest.mark.parametrize("name", ["cifar10_coteaching", "cifar10_coteaching_sym50"])
def test_coteaching_recipes_use_the_official_adam_schedule(tmp_path, name) -> None:
    cli = recipe_cli(name, tmp_path)
    optimizer, scheduler = optimizer_and_scheduler(cli.model.configure_optimizers())
    assert isinstance(optimizer, torch.optim.Adam) and cli.trainer.max_epochs == 200
    lrs, betas = run_epochs(optimizer, scheduler, 200)
    alpha, beta1 = official_coteaching_plans(0.001, 200, 80)
    assert lrs == alpha and [b[0] for b in betas] == beta1
    assert cli.model.hparams.backbone == "coteaching_cnn"


def test_elr_recipe_restarts_its_cosine_every_10_epochs(tmp_path) -> None:
    cli = recipe_cli("cifar10_elr", tmp_path)
    optimizer, scheduler = optimizer_and_scheduler(cli.model.configure_optimizers())
    lrs, _ = run_epochs(optimizer, scheduler, 150)
    # ELR config_cifar10.json: CosineAnnealingWarmRestarts(T_0=10, eta_min=0.001), lr 0.02,
    # stepped once per epoch: eta_min + (lr - eta_min) (1 + cos(pi T_cur / T_0)) / 2.
    expected = [
        0.001 + (0.02 - 0.001) * (1 + math.cos(math.pi * (e % 10) / 10)) / 2 for e in range(150)
    ]
    torch.testing.assert_close(lrs, expected, rtol=0, atol=1e-12)
    assert lrs[10] == pytest.approx(0.02) and lrs[9] < 0.002


@pytest.mark.parametrize("name", ["cifar10_late_stopping", "cifar100_late_stopping"])
def test_late_stopping_recipes_rounds_and_final_run(tmp_path, name) -> None:
    cli = recipe_cli(name, tmp_path)
    late = find_callback(cli.trainer, LateStopping)
    # Rounds: SGD lr 0.01 (momentum 0.9, weight decay 5e-4), no schedule, batch 32.
    rounds = cli.model.configure_optimizers()
    assert isinstance(rounds, torch.optim.SGD)
    assert rounds.param_groups[0]["lr"] == 0.01 and rounds.param_groups[0]["weight_decay"] == 5e-4
    assert cli.datamodule.batch_size == 32 and cli.datamodule.val_fraction == 0.1
    # Final run: SGD lr 0.02 and MultiStepLR([10, 20, 40, 60, 80], 0.5) over 300 epochs.
    optimizer, scheduler = optimizer_and_scheduler(late.configure_final_run(cli.model.parameters()))
    assert late.final_epochs == 300
    lrs, _ = run_epochs(optimizer, scheduler, 300)
    expected = [0.02 * 0.5 ** sum(e >= m for m in (10, 20, 40, 60, 80)) for e in range(300)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[0]["momentum"] == 0.9
