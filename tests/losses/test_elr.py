"""Tests for ELR (Liu et al. 2020) and for every loss as ImageClassifier's criterion.

The ELR reference re-states the official ``elr_loss`` here (a ``num_examples x C`` target table
updated by index before the loss). The DDP test runs this file as a script
(``python test_elr.py OUT_DIR``) on two CPU processes.
"""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _trainers import ddp_trainer, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_noise.losses as losses
import lightning_noise.losses.elr as elr_module
from lightning_noise.callbacks import SAM
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[2]


class OfficialELR:
    """The official update-then-loss step, re-stated with plain tensors (float64)."""

    def __init__(self, num_examples: int, num_classes: int, beta: float, lam: float) -> None:
        self.target = torch.zeros(num_examples, num_classes, dtype=torch.float64)
        self.beta, self.lam = beta, lam

    def __call__(self, index, output, label):
        y_pred = F.softmax(output, dim=1)
        y_pred = torch.clamp(y_pred, 1e-4, 1.0 - 1e-4)
        y_pred_ = y_pred.detach()
        self.target[index] = self.beta * self.target[index] + (1 - self.beta) * (
            y_pred_ / y_pred_.sum(dim=1, keepdim=True)
        )
        ce_loss = F.cross_entropy(output, label)
        elr_reg = (1 - (self.target[index] * y_pred).sum(dim=1)).log().mean()
        return ce_loss + self.lam * elr_reg


def test_doctests() -> None:
    assert doctest.testmod(elr_module, raise_on_error=True).failed == 0


def test_matches_the_official_loss_over_several_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    n, c = 20, 5
    official = OfficialELR(n, c, beta=0.7, lam=3.0)
    ours = losses.ELRLoss(beta=0.7, lam=3.0, num_samples=n).double()
    for _ in range(4):
        index = torch.randperm(n, generator=gen)[:8]
        logits = torch.randn(8, c, generator=gen, dtype=torch.float64) * 2
        label = torch.randint(c, (8,), generator=gen)
        z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        want = official(index, z1, label)
        got = ours(z2, label, index=index)
        torch.testing.assert_close(got, want)
        (g1,) = torch.autograd.grad(want, z1)
        (g2,) = torch.autograd.grad(got, z2)
        torch.testing.assert_close(g2, g1)
        torch.testing.assert_close(ours.targets.double(), official.target, rtol=1e-6, atol=1e-7)


def test_eval_is_cross_entropy_and_does_not_update() -> None:
    loss = losses.ELRLoss(num_samples=4)
    logits, label = torch.randn(3, 4), torch.tensor([0, 1, 2])
    loss(logits, label, index=torch.tensor([0, 1, 2]))
    before = loss.targets.clone()
    loss.eval()
    torch.testing.assert_close(loss(logits, label), F.cross_entropy(logits, label))
    torch.testing.assert_close(
        loss(logits, label, index=torch.tensor([0, 1, 2])), F.cross_entropy(logits, label)
    )
    assert torch.equal(loss.targets, before)
    loss.train()
    with pytest.raises(ValueError, match="index=index"):
        loss(logits, label)
    with pytest.raises(ValueError, match="outside num_samples=4"):
        loss(logits, label, index=torch.tensor([0, 1, 4]))


def test_targets_grow_without_num_samples_and_survive_state_dict() -> None:
    loss = losses.ELRLoss()
    loss(torch.randn(2, 3), torch.tensor([0, 1]), index=torch.tensor([2, 9]))
    assert loss.targets.shape == (10, 3)
    assert loss.targets[[0, 1, 3]].abs().sum() == 0
    copy = losses.ELRLoss()
    copy.load_state_dict(loss.state_dict())
    assert torch.equal(copy.targets, loss.targets)


def test_ignored_entries_neither_update_nor_count() -> None:
    loss = losses.ELRLoss(num_samples=5)
    logits = torch.randn(3, 4)
    out = loss(logits, torch.tensor([1, -100, 2]), index=torch.tensor([0, 1, 2]))
    assert loss.targets[1].abs().sum() == 0 and loss.targets[0].abs().sum() > 0
    fresh = losses.ELRLoss(num_samples=5)
    keep = torch.tensor([0, 2])
    want = fresh(logits[keep], torch.tensor([1, 2]), index=keep)
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------- in Lightning
def digits() -> DigitsDataModule:
    return DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=200, seed=0
    )


def classifier(criterion) -> ImageClassifier:
    return ImageClassifier("test_resnet", num_classes=10, in_chans=1, criterion=criterion)


def test_sam_second_pass_does_not_move_the_targets(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    loss = losses.ELRLoss(beta=0.7, num_samples=1168)
    trainer = make_trainer(tmp_path, [SAM(rho=0.05)], limit_val_batches=0)
    trainer.fit(classifier(loss), datamodule=digits())
    # One epoch: every sample updated exactly once, so each target row sums to 1 - beta.
    torch.testing.assert_close(loss.targets.sum(dim=1), torch.full((1168,), 0.3))


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_is_exact_with_elr(tmp_path) -> None:
    def fit(root, max_epochs, ckpt=None):
        pl.seed_everything(0, verbose=False)
        model = classifier(losses.ELRLoss(num_samples=1168))
        trainer = make_trainer(
            root,
            [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)],
            max_epochs=max_epochs,
            enable_checkpointing=True,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=digits(), ckpt_path=ckpt)
        return model

    straight = fit(tmp_path / "a", 2)
    fit(tmp_path / "b", 1)
    resumed = fit(tmp_path / "c", 2, ckpt=tmp_path / "b" / "last.ckpt")
    assert torch.equal(straight.criterion.targets, resumed.criterion.targets)
    for (key, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key


#: loss module -> its preset under configs/losses/.
PRESETS = {
    "GeneralizedCrossEntropy": "gce.yaml",
    "SymmetricCrossEntropy": "sce.yaml",
    "NCEandRCE": "nce_rce.yaml",
    "NCEandMAE": "nce_mae.yaml",
    "NormalizedCrossEntropy": None,  # parts of APL: no preset of their own
    "MeanAbsoluteError": None,
    "ReverseCrossEntropy": None,
    "LabelSmoothingCrossEntropy": "label_smoothing.yaml",
    "MaxSupLoss": "maxsup.yaml",
    "ELRLoss": "elr.yaml",
}


def test_every_loss_module_is_listed() -> None:
    modules = {n for n in losses.__all__ if n[0].isupper()}
    assert modules == set(PRESETS)
    for preset in filter(None, PRESETS.values()):
        assert (ROOT / "configs" / "losses" / preset).is_file(), preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_loss_trains_as_the_criterion_from_the_cli(tmp_path, name) -> None:
    from lightning_noise.cli import build_cli

    args = [
        "--config",
        str(ROOT / "recipes" / "digits_baseline.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.backbone=test_resnet",
        "--data.init_args.image_size=8",
    ]
    if PRESETS[name] is None:
        args.append(f"--model.init_args.criterion=lightning_noise.losses.{name}")
    else:
        args.append(f"--model.init_args.criterion={ROOT / 'configs' / 'losses' / PRESETS[name]}")
    cli = build_cli(args, run=False)
    assert type(cli.model.criterion).__name__ == name
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    if name == "MaxSupLoss":  # the ramp followed the epochs: alpha of epoch 1 of 2
        assert cli.model.criterion.alpha == pytest.approx(0.2)
    if name == "ELRLoss":  # the targets of exactly the samples of the 3 batches per epoch
        seen = set()
        loader = cli.datamodule.train_dataloader()
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for _, (_, _, index) in zip(range(3), loader, strict=False):
                seen.update(index.tolist())
        updated = torch.nonzero(cli.model.criterion.targets.sum(dim=1) > 0).reshape(-1)
        assert set(updated.tolist()) == seen


# ---------------------------------------------------------------------- DDP
def ddp_main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    loss = losses.ELRLoss(beta=0.7, num_samples=1168)
    trainer = ddp_trainer([], max_epochs=1)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=100, seed=0
    )
    trainer.fit(classifier(loss), datamodule=dm)
    torch.save(loss.targets, Path(out_dir) / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_targets_are_identical_on_every_rank(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(a, b)
    # Every sample was updated from both ranks' batches: once (1 - beta), or twice when the
    # sampler repeated it to even out the shards (1 - beta^2).
    sums = a.sum(dim=1)
    once = torch.isclose(sums, torch.tensor(0.3))
    twice = torch.isclose(sums, torch.tensor(0.51))
    assert bool((once | twice).all()) and int(once.sum()) >= 1160


if __name__ == "__main__":
    ddp_main(sys.argv[1])
