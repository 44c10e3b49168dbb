"""CoTeachingClassifier: the two-network step by hand, resume, DDP, CLI."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _trainers import ddp_trainer, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.models import CoTeachingClassifier

ROOT = Path(__file__).resolve().parents[2]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_two_steps_equal_the_cross_update_by_hand(tmp_path) -> None:
    """Epoch 0 drops nothing (the official schedule); epoch 1 drops half, crosswise."""
    torch.manual_seed(0)
    model = CoTeachingClassifier(
        "test_resnet", num_classes=5, in_chans=1, forget_rate=0.5, num_gradual=1, optimizer=sgd
    )
    # Eval-mode BatchNorm (Lightning keeps a submodule's mode) so the hand copies match exactly.
    model.backbone.eval(), model.backbone2.eval()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))
    net1, net2 = copy.deepcopy(model.backbone), copy.deepcopy(model.backbone2)
    data = TensorDataset(x, y, torch.arange(16))
    make_trainer(tmp_path, [], max_epochs=2, limit_val_batches=0).fit(
        model, DataLoader(data, batch_size=16)
    )

    for keep in (16, 8):
        l1 = F.cross_entropy(net1(x), y, reduction="none")
        l2 = F.cross_entropy(net2(x), y, reduction="none")
        order1, order2 = torch.argsort(l1.detach()), torch.argsort(l2.detach())
        for_net1, for_net2 = order2[:keep], order1[:keep]  # each learns from its peer's picks
        (l1[for_net1].mean() + l2[for_net2].mean()).backward()
        with torch.no_grad():
            for net in (net1, net2):
                for p in net.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    for a, b in zip(model.backbone.parameters(), net1.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(model.backbone2.parameters(), net2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_forget_rate_defaults_to_the_realised_noise_rate(tmp_path) -> None:
    dm = DigitsDataModule(noise=LabelNoise(rate=0.3), image_size=8, channels=1, batch_size=200)
    model = CoTeachingClassifier("test_resnet", num_classes=10, in_chans=1)
    make_trainer(tmp_path, [], max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert model.forget_rate == pytest.approx(dm.train_dataset.noise_rate)
    assert 0 <= float(model.trainer.callback_metrics["coteaching/label_precision"]) <= 1


def test_ensemble_prediction_averages_probabilities() -> None:
    model = CoTeachingClassifier("test_resnet", num_classes=4, in_chans=1, predict_with="ensemble")
    model.eval()
    x = torch.randn(3, 1, 16, 16)
    expected = (model.backbone(x).softmax(1) + model.backbone2(x).softmax(1)) / 2
    torch.testing.assert_close(model(x).exp(), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"forget_rate": 1.0}, "forget_rate"), ({"num_gradual": 0}, "num_gradual"),
     ({"exponent": 0.0}, "exponent"), ({"plus_start_epoch": -1}, "plus_start_epoch"),
     ({"schedule_offset": -1}, "schedule_offset"), ({"plus_variant": "code"}, "plus_variant"),
     ({"predict_with": "mean"}, "predict_with")],
)  # fmt: skip
def test_bad_hyperparameters(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CoTeachingClassifier("test_resnet", **kwargs)


def _fit(root: Path, max_epochs: int, ckpt=None, plus=None) -> CoTeachingClassifier:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=200, seed=0
    )
    model = CoTeachingClassifier(
        "test_resnet", num_classes=10, in_chans=1, num_gradual=2, plus_start_epoch=plus
    )
    trainer = make_trainer(
        root, [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)],
        max_epochs=max_epochs, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model


@pytest.mark.parametrize("plus", [None, 1], ids=["co-teaching", "co-teaching+"])
def test_resume_is_exact_for_both_networks(tmp_path, plus) -> None:
    straight = _fit(tmp_path / "a", 3, plus=plus)
    _fit(tmp_path / "b", 1, plus=plus)
    resumed = _fit(tmp_path / "c", 3, ckpt=tmp_path / "b" / "last.ckpt", plus=plus)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(k.startswith("backbone2.") for k in straight.state_dict())


@pytest.mark.parametrize(
    "extra",
    [[], ["--model.init_args.plus_start_epoch=1", "--model.init_args.schedule_offset=1",
          "--model.init_args.plus_variant=official_code"],
     ["--model.init_args.forget_rate=estimate", "--trainer.max_epochs=2"]],
    ids=["co-teaching", "co-teaching+ official code", "estimated forget rate"],
)  # fmt: skip
def test_recipe_runs_from_the_cli(tmp_path, extra) -> None:
    from lightning_noise.cli import build_cli

    cli = build_cli(
        [
            "fit", "--config", str(ROOT / "recipes" / "digits_coteaching.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet", "--data.init_args.image_size=8", *extra,
        ]
    )  # fmt: skip
    assert isinstance(cli.model, CoTeachingClassifier)
    assert "coteaching/forget_rate" in cli.trainer.callback_metrics
    if "--model.init_args.forget_rate=estimate" in extra:  # fitted on epoch 0's losses
        estimate = cli.model.noise_rate_estimate
        assert estimate.fitted_epoch == 0 and cli.model.forget_rate == estimate.value
        assert float(cli.trainer.callback_metrics["noise_rate/estimate"]) == pytest.approx(
            estimate.value
        )
    elif extra:  # epoch 0 counts as the official loop's epoch 1: Co-teaching+ and tau / 9
        assert cli.model.plus_variant == "official_code" and cli.model.schedule_offset == 1
        rate = float(cli.trainer.callback_metrics["coteaching/forget_rate"])
        assert rate == pytest.approx(cli.model.forget_rate / 9)


def _ddp_main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=100, seed=0
    )
    model = CoTeachingClassifier("test_resnet", num_classes=10, in_chans=1, forget_rate=0.4,
                                 num_gradual=1, plus_start_epoch=1)  # fmt: skip
    trainer = ddp_trainer([], max_epochs=2)
    trainer.fit(model, datamodule=dm)
    params = {k: p.detach() for k, p in model.named_parameters()}
    torch.save(params, Path(out_dir) / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_replicas_stay_identical(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
