"""Audit: the per-step code of the library makes no host synchronisation (issue 14).

DESIGN.md 8: per-step code does not wait for the GPU. On the CPU a sync cannot be seen, so
this test patches the tensor methods that read a value on the host (``.item()``, ``bool``,
``float``, ``int``, ``__index__``, ``.tolist()``, ``.cpu()``, ``.numpy()``) while a training
step runs (from the first ``on_train_batch_start`` to the last ``on_train_batch_end``; epoch
ends, checkpoints and setup are not audited) and records the file and function that called
them. A call from inside ``lightning_noise/`` fails the test, unless listed in ``KNOWN``
with the reason it stays. The first step is not audited: one-time checks may run there.

Calls from torch, torchmetrics and Lightning are not ours to fix; the ones seen here on the
CPU (torch 2.14, Lightning 2.6, SAM case) are torch's optimizers reading their ``step``
counters (``torch/optim/optimizer.py:_get_value``, ``.item()``; a CPU tensor unless the
optimizer is ``capturable``) and torchmetrics' NaN check of the values its aggregation
metrics receive (``torchmetrics/aggregation.py:_cast_and_nan_check_input``, ``bool``; the
epoch means of logged values). Lightning itself read nothing in these steps.

Where CUDA is available the same steps also run on the GPU under
``torch.cuda.set_sync_debug_mode("warn")``, and every sync warning raised from a
``lightning_noise/`` line fails the test. ("warn", not "error": Lightning's own syncs would
raise first and hide ours.)
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import lightning_noise
import lightning_noise.callbacks as callbacks
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.models import CoTeachingClassifier, ImageClassifier

PACKAGE = str(Path(lightning_noise.__file__).resolve().parent)

#: Host reads in the library that stay, "path:function" -> why.
KNOWN = {
    # NonFiniteGuard decides on the host whether the optimizer steps: skipping a step needs
    # the verdict there (as GradScaler.step reads found_inf). One fused check, one sync.
    "callbacks/nonfinite.py:on_before_optimizer_step": "the skip decision itself",
}

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class _Recorder:
    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda  # also run the audited steps under CUDA's sync debug mode
        self.active = False
        self.steps = 0
        self.calls: list[tuple[str, str, int, str]] = []  # (file, function, line, method)


def _patched(recorder: _Recorder, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if recorder.active:
            frame = sys._getframe(1)
            code = frame.f_code
            recorder.calls.append((code.co_filename, code.co_name, frame.f_lineno, name))
        return original(self, *args, **kwargs)

    return read


class _Start(pl.Callback):
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.recorder.active = trainer.global_step >= 1  # the first step is setup
        if self.recorder.cuda and self.recorder.active:
            torch.cuda.set_sync_debug_mode("warn")


class _End(pl.Callback):
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.recorder.steps += int(self.recorder.active)
        self.recorder.active = False
        if self.recorder.cuda:
            torch.cuda.set_sync_debug_mode("default")


TINY_VIT = dict(img_size=8, patch_size=4, depth=3, embed_dim=48, num_heads=3)

#: name -> the callbacks of the run (NoiseFiT gets a tiny ViT, the others a small ResNet).
CASES: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain": lambda: [],
    "GradientNoise": lambda: [callbacks.GradientNoise(eta=0.01)],
    "SAM": lambda: [callbacks.SAM(rho=0.05)],
    "ASAM": lambda: [callbacks.ASAM(rho=0.5)],
    "FSAM": lambda: [callbacks.FSAM(rho=0.05, mask_interval=1)],
    "SmallLossSelection": lambda: [callbacks.SmallLossSelection(forget_rate=0.4, num_gradual=2)],
    "AdaptiveK": lambda: [callbacks.AdaptiveK(warmup_epochs=0)],
    "TrainingDynamics": lambda: [TrainingDynamics()],
    "NonFiniteGuard": lambda: [callbacks.NonFiniteGuard()],
    "NoiseFiT": lambda: [callbacks.NoiseFiT(num_layers=2)],
    "KernelSwap": lambda: [callbacks.KernelSwap()],
    "LateStopping": lambda: [
        TrainingDynamics(),
        callbacks.LateStopping(rate=0.05, rounds_per_k=(1,), warmup_epochs=0, final_epochs=1),
    ],
    "LabelAudit": lambda: [TrainingDynamics(), callbacks.LabelAudit(score="aum")],
    # The model, not a callback: Co-teaching's two networks (plain Co-teaching; Co-teaching+
    # counts its disagreements on the host, the size of the set it selects from).
    "CoTeachingClassifier": lambda: [],
    "SAM+SmallLossSelection+TrainingDynamics": lambda: [
        callbacks.SAM(rho=0.05),
        callbacks.SmallLossSelection(forget_rate=0.4, num_gradual=2),
        TrainingDynamics(),
    ],
}

#: Cases with a known sync outside the files this audit's change could touch: xfail (strict,
#: so the entry must go once the sync is gone).
XFAIL: dict[str, str] = {}


def _fit(name: str, recorder: _Recorder, tmp_path: Path, accelerator: str) -> None:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=64, seed=0
    )
    if name == "CoTeachingClassifier":
        model = CoTeachingClassifier("test_resnet", num_classes=10, in_chans=1, num_gradual=1)
    elif name == "NoiseFiT":
        model = ImageClassifier(
            "vit_tiny_patch16_224", num_classes=10, in_chans=1, backbone_kwargs=TINY_VIT
        )
    else:
        model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[_Start(recorder), *CASES[name](), _End(recorder)],
    )
    trainer.fit(model, datamodule=dm)


def _ours(path: str, function: str) -> str | None:
    """``"path:function"`` relative to the package, or ``None`` outside it."""
    resolved = str(Path(path).resolve())
    if not resolved.startswith(PACKAGE):
        return None
    return f"{Path(resolved).relative_to(PACKAGE).as_posix()}:{function}"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n], strict=True)) if n in XFAIL else n
        for n in CASES
    ],
)
def test_training_step_makes_no_host_sync(name, tmp_path, monkeypatch) -> None:
    ours = _audit(name, tmp_path, monkeypatch)
    assert not ours, f"host syncs in the per-step code of lightning_noise: {ours}"


def test_the_audit_sees_a_sync_in_the_package(tmp_path, monkeypatch) -> None:
    """A ``float(loss)`` compiled as package code inside ``reduce_loss`` is reported."""
    from lightning_noise.mixins import PerSampleLossMixin

    namespace: dict[str, Any] = {"original": PerSampleLossMixin.reduce_loss}
    source = (
        "def reduce_loss(self, losses, batch):\n"
        "    loss = original(self, losses, batch)\n"
        "    float(loss)\n"
        "    return loss\n"
    )
    exec(compile(source, f"{PACKAGE}/mixins/per_sample.py", "exec"), namespace)
    monkeypatch.setattr(PerSampleLossMixin, "reduce_loss", namespace["reduce_loss"])
    ours = _audit("plain", tmp_path, monkeypatch)
    assert ours == ["mixins/per_sample.py:reduce_loss (line 3, __float__)"]


def _audit(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The audited steps' host reads from package code not in ``KNOWN``."""
    recorder = _Recorder()
    for method in READS:
        monkeypatch.setattr(
            torch.Tensor, method, _patched(recorder, method, getattr(torch.Tensor, method))
        )
    _fit(name, recorder, tmp_path, "cpu")
    monkeypatch.undo()
    assert recorder.steps == 2, "the audit saw no training step"
    return sorted(
        {
            f"{where} (line {line}, {method})"
            for path, function, line, method in recorder.calls
            if (where := _ours(path, function)) is not None and where not in KNOWN
        }
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [n for n in CASES if n not in XFAIL])
def test_training_step_makes_no_cuda_sync(name, tmp_path) -> None:
    recorder = _Recorder(cuda=True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _fit(name, recorder, tmp_path, "gpu")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert recorder.steps == 2, "the audit saw no training step"
    known_files = {key.split(":")[0] for key in KNOWN}
    ours = sorted(
        {
            f"{where}:{w.lineno}"
            for w in seen
            if "synchroniz" in str(w.message)
            and (where := _ours(w.filename, "")) is not None
            and where.split(":")[0] not in known_files
        }
    )
    assert not ours, f"CUDA syncs from lightning_noise lines: {ours}"
