"""Training a ``torch.compile``-d model with the library's callbacks (issue 15).

A model compiled with ``torch.compile``, in its ``configure_model`` or directly
(``trainer.fit(torch.compile(model))``, which Lightning unwraps and runs compiled), trains
with every callback and ends where the same run in eager mode ends, within float tolerance:
the compiled kernels differ from eager ones only in rounding.

The default test trains a small MLP compiled by inductor (C++ on the CPU, built with gcc)
with six callbacks at once, KernelSwap's fused cross-entropy inside the compiled graph, and
checks that the compiled step had no graph break. The slow tests run every callback of the
settings table (tests/callbacks/test_settings.py) and ELR's loss on the real stack
(ImageClassifier on digits), compiled directly.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _trainers import make_trainer
from torch import nn

import lightning_noise.callbacks as callbacks
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.kernels import FusedCrossEntropyLoss
from lightning_noise.losses import ELRLoss
from lightning_noise.mixins import PerSampleLossMixin
from lightning_noise.models import CoTeachingClassifier
from lightning_noise.types import SampleBatch

sys.path.insert(0, str(Path(__file__).parent / "callbacks"))
from test_settings import SETTINGS  # the settings table of every callback

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="inductor compiles C++ with gcc on the CPU"
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


class Step(nn.Module):
    """Logits and per-sample losses: the network and its criterion in one module, so that
    compiling it puts the criterion (the fused cross-entropy once KernelSwap has swapped it in
    at setup) inside the compiled graph."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss(reduction="none")

    def forward(self, x, target):
        logits = self.net(x)
        return logits, self.criterion(logits, target)


class CompiledMLP(PerSampleLossMixin, pl.LightningModule):
    """An MLP on 8x8 digits whose step module is compiled in ``configure_model`` when
    ``compile=True`` (``nn.Module.compile``: in place, the state dict's keys unchanged)."""

    def __init__(self, compile: bool) -> None:
        super().__init__()
        self.compile_step = compile
        self.step = Step()

    def configure_model(self) -> None:
        if self.compile_step:
            self.step.compile(fullgraph=True)

    def training_step(self, batch, batch_idx):
        x, target, index = batch
        logits, losses = self.step(x, target)
        sample_batch = SampleBatch.create(index, target, logits, losses)
        return self.step_outputs(self.reduce_loss(losses, sample_batch), sample_batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _digits(batch_size: int = 100) -> DigitsDataModule:
    # 1797 digits: 1079 for training with these fractions; the last smaller batch is dropped
    # by limit_train_batches below, so every compiled step has the same shapes
    return DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=batch_size, seed=0
    )


def _six_callbacks() -> list[pl.Callback]:
    return [
        TrainingDynamics(),
        callbacks.KernelSwap(impl="torch"),
        callbacks.SAM(rho=0.05),
        callbacks.GradientNoise(eta=0.01),
        callbacks.SmallLossSelection(forget_rate=0.3, num_gradual=2),
        callbacks.NonFiniteGuard(),
    ]


def test_compiled_model_trains_with_six_callbacks_like_eager(tmp_path) -> None:
    finals = {}
    for compile in (False, True):
        pl.seed_everything(0, verbose=False)
        model = CompiledMLP(compile)
        cbs = _six_callbacks()
        trainer = make_trainer(
            tmp_path, cbs, max_epochs=2, limit_train_batches=10, limit_val_batches=0
        )
        trainer.fit(model, datamodule=_digits())
        assert isinstance(model.step.criterion, FusedCrossEntropyLoss)  # swapped before compiling
        assert trainer.global_step == 20
        finals[compile] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if compile:
            stats = torch._dynamo.utils.counters
            assert not stats["graph_break"], dict(stats["graph_break"])
            assert stats["stats"]["unique_graphs"] >= 1  # the step really ran compiled
            # the observer recorded the compiled steps' samples (2 x 10 batches of 100)
            assert int(cbs[0].store.update_count.sum()) == 2000
    start = CompiledMLP(False)
    for key, eager in finals[False].items():
        torch.testing.assert_close(finals[True][key], eager, rtol=1e-4, atol=1e-4, msg=key)
    trained = finals[False]["step.net.1.weight"]
    assert not torch.equal(trained, start.step.net[1].weight)  # it trained


#: The backend of the slow tests (LIGHTNING_NOISE_COMPILE_BACKEND=aot_eager checks the tracing
#: alone in a fraction of the time; the default is inductor, what users get).
BACKEND = os.environ.get("LIGHTNING_NOISE_COMPILE_BACKEND", "inductor")


def _fit_real_stack(tmp_path: Path, name: str, compile: bool, criterion=None):
    setting = SETTINGS[name]
    pl.seed_everything(0, verbose=False)
    model = setting.model()
    # SGD: AdamW's first steps move each weight by about lr * sign(gradient), which turns the
    # compiled code's rounding on near-zero gradients into differences of lr
    model.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if criterion is not None:
        model.criterion = criterion()
        model.criterion.reduction = "none"
    cbs = [setting.make()]
    if setting.dynamics:
        cbs.insert(0, TrainingDynamics())
    trainer = make_trainer(tmp_path, cbs, max_epochs=2, limit_train_batches=5, limit_val_batches=0)
    fitted = torch.compile(model, backend=BACKEND) if compile else model
    trainer.fit(fitted, datamodule=_digits(200))
    # ELR's targets are the criterion's extra state, a dict (assert_close compares it too)
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in model.state_dict().items()
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two fits and a compile of a ResNet: minutes on a loaded CPU
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_callback_with_a_directly_compiled_classifier(tmp_path, name) -> None:
    """``trainer.fit(torch.compile(ImageClassifier(...)))`` with each callback equals eager."""
    eager = _fit_real_stack(tmp_path / "eager", name, compile=False)
    compiled = _fit_real_stack(tmp_path / "compiled", name, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_elr_loss_with_a_directly_compiled_classifier(tmp_path) -> None:
    def elr():
        return ELRLoss(beta=0.7, lam=3.0, num_samples=1168)  # the digits' training split

    eager = _fit_real_stack(tmp_path / "e", "NonFiniteGuard", compile=False, criterion=elr)
    compiled = _fit_real_stack(tmp_path / "c", "NonFiniteGuard", compile=True, criterion=elr)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.slow  # a second inductor build (~20 s); tests/kernels/test_compile.py checks the
# kernels' compiled values and gradients by default with aot_eager
def test_fused_loss_matches_pytorch_inside_the_compiled_step() -> None:
    """The compiled step's per-sample losses and gradients are PyTorch's cross-entropy's."""
    torch.manual_seed(0)
    model = CompiledMLP(compile=True)
    model.step.criterion = FusedCrossEntropyLoss(reduction="none", impl="torch")
    model.configure_model()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    _, losses = model.step(x, y)
    losses.sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = F.cross_entropy(model.step.net(x), y, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


class CompiledCoTeaching(CoTeachingClassifier):
    """Co-teaching with both networks compiled in ``configure_model``, as a user would."""

    def __init__(self, compile: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.compile_networks = compile

    def configure_model(self) -> None:
        if self.compile_networks:
            self.backbone.compile(backend=BACKEND)
            self.backbone2.compile(backend=BACKEND)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_coteaching_with_both_networks_compiled_equals_eager(tmp_path) -> None:
    """Co-teaching's two networks compiled: the cross-update (each network trains on the other's
    small-loss samples) ends where eager ends, and the selection really dropped samples."""
    finals = {}
    for compile in (False, True):
        pl.seed_everything(0, verbose=False)
        model = CompiledCoTeaching(
            compile, backbone="test_resnet", num_classes=10, in_chans=1,
            forget_rate=0.4, num_gradual=1,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        )  # fmt: skip
        trainer = make_trainer(
            tmp_path / str(compile), [], max_epochs=2, limit_train_batches=5,
            limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, datamodule=_digits(50))
        assert trainer.callback_metrics["coteaching/kept_fraction"] < 0.9  # samples were dropped
        finals[compile] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if compile:  # both networks ran compiled (one graph may serve both: same code)
            assert model.backbone._compiled_call_impl is not None
            assert model.backbone2._compiled_call_impl is not None
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for key, eager in finals[False].items():
        torch.testing.assert_close(finals[True][key], eager, rtol=1e-4, atol=1e-4, msg=key)
