"""KernelSwap: what it replaces, what it leaves, and that training then runs the kernels."""

from __future__ import annotations

import doctest
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _trainers import make_trainer
from torch import nn

import lightning_noise.callbacks.kernels as swap_module
from lightning_noise.callbacks import KernelSwap
from lightning_noise.cli import build_cli
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.kernels import LAUNCHES, FusedCrossEntropyLoss, FusedSoftmax
from lightning_noise.losses import MaxSupLoss
from lightning_noise.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[2]


def test_doctests() -> None:
    assert doctest.testmod(swap_module, raise_on_error=True).failed == 0


class SoftmaxHead(ImageClassifier):
    """An ImageClassifier whose head ends in an nn.Softmax, scored by NLL of its output."""

    def __init__(self, **kwargs) -> None:
        super().__init__("test_resnet", num_classes=10, in_chans=1, **kwargs)
        self.probs = nn.Softmax(dim=-1)

    def forward(self, x):
        return self.probs(super().forward(x)).clamp_min(1e-12).log()


def _digits() -> DigitsDataModule:
    return DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=128, seed=0
    )


def _train(tmp_path, model, callbacks) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=4).fit(
        model, datamodule=_digits()
    )
    return model


def test_swapped_model_has_plain_gradients_and_trains_with_the_kernels(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    swapped = SoftmaxHead()
    plain = SoftmaxHead()
    plain.load_state_dict(swapped.state_dict())
    swap = KernelSwap()
    assert swap.swap(swapped) == {
        "criterion": "CrossEntropyLoss -> FusedCrossEntropyLoss",
        "probs": "Softmax -> FusedSoftmax",
    }
    assert swapped.criterion.reduction == "none"  # the classifier's per-sample reduction kept
    dm = _digits()
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    before = dict(LAUNCHES)
    for model in (swapped, plain):
        model.per_sample_loss(model(x), y, index).mean().backward()
    for name in ("softmax_forward", "softmax_backward", "ce_forward", "ce_backward"):
        assert LAUNCHES[name] > before.get(name, 0), name
    for (key, a), b in zip(swapped.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=key)

    # In a Trainer the swap happens at setup and the kernels run in every step.
    model = SoftmaxHead()
    swap = KernelSwap()
    before = LAUNCHES["ce_backward"]
    _train(tmp_path, model, [swap])
    assert isinstance(model.criterion, FusedCrossEntropyLoss)
    assert isinstance(model.probs, FusedSoftmax)
    assert swap.backend == "triton"  # the suite runs Triton's interpreter
    assert LAUNCHES["ce_backward"] >= before + 4


def test_our_losses_switch_to_the_kernel_and_weighted_ce_is_left(tmp_path) -> None:
    maxsup = MaxSupLoss(impl="torch")
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1, criterion=maxsup)
    swap = KernelSwap(impl="triton")
    before = LAUNCHES["ce_forward"]
    _train(tmp_path, model, [swap])
    assert model.criterion is maxsup and maxsup.impl == "triton"
    assert swap.replaced == {"criterion": "MaxSupLoss -> impl='triton'"}
    assert LAUNCHES["ce_forward"] > before

    weighted = nn.CrossEntropyLoss(weight=torch.ones(10))
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1, criterion=weighted)
    swap = KernelSwap()
    with pytest.warns(UserWarning, match="no nn.Softmax or cross-entropy"):
        _train(tmp_path / "w", model, [swap])
    assert model.criterion is weighted
    assert "class weights" in swap.skipped["criterion"]


def test_fused_cross_entropy_module_keeps_pytorch_semantics() -> None:
    x = torch.randn(4, 5, 3, 2, requires_grad=True)  # class dimension 1, as in PyTorch
    y = torch.randint(0, 5, (4, 3, 2))
    y[0, 0, 0] = -100
    for reduction in ("none", "mean", "sum"):
        torch_loss = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.2)
        fused = FusedCrossEntropyLoss.from_module(torch_loss, impl="triton")
        got, want = fused(x, y), torch_loss(x, y)
        torch.testing.assert_close(got, want)
        g1, g2 = (torch.autograd.grad(v.sum(), x)[0] for v in (got, want))
        torch.testing.assert_close(g1, g2)
    soft = torch.softmax(torch.randn(4, 5), dim=1)  # probability targets go to PyTorch
    torch.testing.assert_close(
        FusedCrossEntropyLoss()(x[:, :, 0, 0], soft), nn.CrossEntropyLoss()(x[:, :, 0, 0], soft)
    )
    with pytest.raises(ValueError, match="class weights"):
        FusedCrossEntropyLoss.from_module(nn.CrossEntropyLoss(weight=torch.ones(5)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="impl must be"):
        KernelSwap(impl="cuda")
    with pytest.raises(ValueError, match="does nothing"):
        KernelSwap(softmax=False, cross_entropy=False)


def test_kernel_swap_from_the_cli(tmp_path) -> None:
    before = LAUNCHES["ce_forward"]
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "digits_baseline.yaml"),
            f"--trainer.callbacks+={ROOT / 'configs' / 'callbacks' / 'kernel_swap.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet",
            "--data.init_args.image_size=16",
        ]
    )
    swap = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KernelSwap))
    assert "criterion" in swap.replaced and LAUNCHES["ce_forward"] > before
