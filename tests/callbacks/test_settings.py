"""Cross-cutting tests driven by one settings table: every callback, the same checks.

Each entry of ``SETTINGS`` names a callback exported by ``lightning_noise.callbacks``, how to
build it for a short run, and its YAML preset. Every entry is trained for a few steps on the
real stack (digits, ImageClassifier), resumed from a checkpoint, built from its preset with
the CLI, and trained under DDP on two CPU processes. A callback with no entry fails the suite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _trainers import ddp_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_noise.callbacks as callbacks
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Setting:
    make: Callable[[], pl.Callback]
    preset: str  # file under configs/callbacks/
    dynamics: bool = False  # reads the TrainingDynamics store (added before it)
    changes_training: bool = True  # False for observers: the weights must equal plain training
    # For changes_training=False: how close to plain training (0: bitwise). KernelSwap computes
    # the same loss with other float32 roundings, which AdamW's first steps (about lr * sign of
    # each gradient) can amplify to ~lr on near-zero gradients.
    plain_atol: float = 0.0
    backbone: str = "test_resnet"  # NoiseFiT needs transformer blocks
    backbone_kwargs: dict | None = None

    def model(self) -> ImageClassifier:
        return ImageClassifier(
            self.backbone, num_classes=10, in_chans=1, backbone_kwargs=self.backbone_kwargs
        )


#: A ViT small enough for tests: 3 blocks on 8x8 digits.
TINY_VIT = dict(img_size=8, patch_size=4, depth=3, embed_dim=48, num_heads=3)


SETTINGS: dict[str, Setting] = {
    "GradientNoise": Setting(lambda: callbacks.GradientNoise(eta=0.01), "gradient_noise.yaml"),
    "SAM": Setting(lambda: callbacks.SAM(rho=0.05), "sam.yaml"),
    "ASAM": Setting(lambda: callbacks.ASAM(rho=0.5), "asam.yaml"),
    "FSAM": Setting(lambda: callbacks.FSAM(rho=0.05, mask_interval=3), "fsam.yaml"),
    "SmallLossSelection": Setting(
        lambda: callbacks.SmallLossSelection(forget_rate=0.4, num_gradual=2), "small_loss.yaml"
    ),
    "AdaptiveK": Setting(lambda: callbacks.AdaptiveK(warmup_epochs=0), "adaptive_k.yaml"),
    # rate 0.05: round 1 ends after epoch 0 (58 FkL examples), so the resume crosses the
    # switch to the final run on the kept set.
    "LateStopping": Setting(
        lambda: callbacks.LateStopping(
            rate=0.05, rounds_per_k=(1,), warmup_epochs=0, final_epochs=1
        ),
        "late_stopping.yaml",
        dynamics=True,
    ),
    "NoiseFiT": Setting(
        lambda: callbacks.NoiseFiT(num_layers=2),
        "noisefit.yaml",
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=TINY_VIT,
    ),
    # On a healthy run the non-finite policy changes nothing: weights equal plain training.
    "NonFiniteGuard": Setting(
        lambda: callbacks.NonFiniteGuard(), "nonfinite_guard.yaml", changes_training=False
    ),
    "KernelSwap": Setting(
        lambda: callbacks.KernelSwap(), "kernel_swap.yaml", changes_training=False, plain_atol=5e-3
    ),
    "LabelAudit": Setting(
        lambda: callbacks.LabelAudit(score="aum"),
        "label_audit.yaml",
        dynamics=True,
        changes_training=False,
    ),
}
NAMES = sorted(SETTINGS)


def test_every_callback_has_a_setting() -> None:
    # SamplePolicyCallback is the base class of user policies, not a method; ResumableCheckpoint
    # saves checkpoints (tests/test_crash_resume.py and tests/test_compat.py test its resume).
    methods = set(callbacks.__all__) - {"SamplePolicyCallback", "ResumableCheckpoint"}
    assert methods == set(SETTINGS), "add the new callback to SETTINGS"


def _with_dynamics(name: str, callback: pl.Callback | None) -> list[pl.Callback]:
    """The callback, after a ``TrainingDynamics`` when its setting reads the store."""
    if callback is None:
        return [TrainingDynamics()]  # observes only: plain training with every setting
    return [TrainingDynamics(), callback] if SETTINGS[name].dynamics else [callback]


def _fit(
    tmp_path: Path,
    callback: pl.Callback | None,
    *,
    max_epochs: int,
    name: str,
    ckpt: Path | None = None,
) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=200, seed=0
    )
    model = SETTINGS[name].model()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[
            *_with_dynamics(name, callback),
            ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0),
        ],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_trains_and_resumes_exactly_on_the_real_stack(tmp_path, name) -> None:
    setting = SETTINGS[name]
    straight = _fit(tmp_path / "a", setting.make(), max_epochs=2, name=name)
    _fit(tmp_path / "b", setting.make(), max_epochs=1, name=name)
    ckpt = tmp_path / "b" / "last.ckpt"
    resumed = _fit(tmp_path / "c", setting.make(), max_epochs=2, ckpt=ckpt, name=name)
    plain = _fit(tmp_path / "d", None, max_epochs=2, name=name)
    changed, tol = False, setting.plain_atol
    for (key, a), b, c in zip(
        straight.state_dict().items(),
        resumed.state_dict().values(),
        plain.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: {key} differs on resume")
        if tol and a.is_floating_point():
            changed = changed or not torch.allclose(a, c, rtol=0, atol=tol)
        else:
            changed = changed or not torch.equal(a, c)
    if setting.changes_training:
        assert changed, f"{name} trained exactly like plain training"
    else:
        assert not changed, f"{name} only observes, but training differs from plain training"


@pytest.mark.parametrize("name", NAMES)
def test_preset_builds_from_the_cli(name) -> None:
    from lightning_noise.cli import build_cli

    preset = ROOT / "configs" / "callbacks" / SETTINGS[name].preset
    cli = build_cli(
        [
            "--config",
            str(ROOT / "recipes" / "digits_baseline.yaml"),
            f"--trainer.callbacks+={preset}",
        ],
        run=False,
    )
    assert any(type(cb).__name__ == name for cb in cli.trainer.callbacks)


def _ddp_main(out_dir: str) -> None:
    for name in NAMES:
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(
            noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=100, seed=0
        )
        model = SETTINGS[name].model()
        callbacks_ = _with_dynamics(name, SETTINGS[name].make())
        trainer = ddp_trainer(callbacks_, max_steps=3, default_root_dir=out_dir)
        trainer.fit(model, datamodule=dm)
        # Parameters only: BatchNorm buffers of rank 1 legitimately differ after the last step
        # (DDP broadcasts rank 0's buffers at the start of each forward, not after it).
        params = {k: p.detach() for k, p in model.named_parameters()}
        torch.save(params, Path(out_dir) / f"{name}_rank{trainer.global_rank}.pt")
        trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_replicas_stay_identical_under_ddp(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    for name in NAMES:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        for key, value in ranks[0].items():
            assert torch.equal(value, ranks[1][key]), f"{name}: {key} diverged across ranks"


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
