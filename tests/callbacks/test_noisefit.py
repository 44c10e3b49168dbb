"""Tests for NoiseFiT (Khadangi et al. 2025).

The references re-state the official v1 formulas here: ``adaptive_noise_injection`` (robust
per-token statistics), the SNR of ``select_layers`` and the hybrid loss of ``compute_loss``,
written with explicit softmax/log sums rather than ``F.kl_div``.
"""

from __future__ import annotations

import doctest

import lightning.pytorch as pl
import pytest
import torch
from _trainers import make_trainer
from torch import nn

import lightning_noise.callbacks.noisefit as noisefit_module
import lightning_noise.losses.noisefit as noisefit_losses
from lightning_noise.callbacks import NoiseFiT
from lightning_noise.callbacks.noisefit import find_blocks
from lightning_noise.data import DigitsDataModule
from lightning_noise.losses.noisefit import adaptive_noise, hybrid_loss, layer_snr
from lightning_noise.models import ImageClassifier


def official_noise(h, base_std, beta, generator):
    """The official ``adaptive_noise_injection`` (logits=None, scale = gate = 1)."""
    embed_var = h.var(dim=-1, keepdim=True)
    factor = torch.clamp(torch.exp(embed_var / (embed_var.mean() + 1e-6)), max=5.0)
    median = h.median(dim=-1, keepdim=True).values
    mad = (h - median).abs().median(dim=-1, keepdim=True).values
    mad = mad.clamp(min=1e-6 * h.norm(dim=-1, keepdim=True))
    weight = torch.exp(-beta * torch.abs(h - median) / (mad + 1e-6))
    scale = base_std * mad * weight * factor
    return h + torch.randn(h.shape, generator=generator, dtype=h.dtype) * scale


def test_doctests() -> None:
    for module in (noisefit_module, noisefit_losses):
        assert doctest.testmod(module, raise_on_error=True).failed == 0


def test_adaptive_noise_is_the_official_formula() -> None:
    h = torch.randn(3, 5, 16, dtype=torch.float64)
    h[0, 0, 3] = 40.0  # an outlier coordinate gets less noise
    got = adaptive_noise(h, 0.2, beta=0.1, generator=torch.Generator().manual_seed(1))
    want = official_noise(h, 0.2, 0.1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)


def test_layer_snr_is_the_official_select_layers_ratio() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 6, 8, generator=gen) * s for s in (1.0, 5.0, 0.2)]
    got = layer_snr(hidden, noise_std=0.1, passes=10, generator=torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    want = []
    for h in hidden:
        diffs = [
            (official_noise(h, 0.1 * h.std().item(), 0.1, reference) - h).abs().mean()
            for _ in range(10)
        ]
        want.append(h.abs().mean() / (torch.stack(diffs).mean() + 1e-6))
    torch.testing.assert_close(got, torch.stack(want))


def kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per row, from explicit sums."""
    p = torch.exp(p_logits - torch.logsumexp(p_logits, -1, keepdim=True))
    log_p = torch.log(p)
    log_q = q_logits - torch.logsumexp(q_logits, -1, keepdim=True)
    return (p * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("detach", [False, True])
def test_hybrid_loss_terms_match_the_formula(detach) -> None:
    gen = torch.Generator().manual_seed(0)
    z, z1, z2 = (torch.randn(4, 6, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    z.requires_grad_(True)
    z1.requires_grad_(True)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    ce = torch.tensor(1.7, dtype=torch.float64)
    total, parts = hybrid_loss(ce, z, z1, z2, mask=mask, alpha=0.5, lam=0.1, detach_clean=detach)
    m = mask.double()
    soft = ((0.5 * (kl(z, z1) + kl(z, z2))) * m).sum() / m.sum()
    cons = (kl(z2, z1) * m).sum() / m.sum()
    torch.testing.assert_close(total, 0.5 * ce + 0.5 * soft + 0.1 * cons)
    torch.testing.assert_close(parts["soft"], soft.detach())
    torch.testing.assert_close(parts["consistency"], cons.detach())
    (grad,) = torch.autograd.grad(total, z, allow_unused=True)
    assert (grad is None) == detach  # v2 stops the gradient through the clean targets


# ----------------------------------------------------------------------------- in Lightning
def vit(depth: int = 3) -> ImageClassifier:
    return ImageClassifier(
        "vit_tiny_patch16_224",
        num_classes=10,
        in_chans=1,
        backbone_kwargs=dict(img_size=8, patch_size=4, depth=depth, embed_dim=48, num_heads=3),
    )


def digits() -> DigitsDataModule:
    return DigitsDataModule(image_size=8, channels=1, batch_size=64, seed=0)


def test_layer_discovery_finds_the_block_containers() -> None:
    assert [n for n, _ in find_blocks(vit(3))] == [f"backbone.blocks.{i}" for i in range(3)]

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.h = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    assert [n for n, _ in find_blocks(LM())] == ["transformer.h.0", "transformer.h.1"]
    assert [n for n, _ in find_blocks(LM(), ["transformer.h.1"])] == ["transformer.h.1"]
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        find_blocks(LM(), ["nope"])
    with pytest.raises(ValueError, match="pass the blocks' module names"):
        find_blocks(nn.Linear(2, 2))


def fit(tmp_path, callback, *, seed=0, callbacks=None, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = vit()
    callbacks = [callback] if callbacks is None else callbacks
    trainer = make_trainer(tmp_path, callbacks, max_steps=2, limit_val_batches=1, **kwargs)
    trainer.fit(model, datamodule=digits())
    return model, trainer


def test_layer_choice_is_deterministic_and_is_the_snr_top_k(tmp_path) -> None:
    first, second = NoiseFiT(num_layers=2, seed=5), NoiseFiT(num_layers=2, seed=5)
    fit(tmp_path / "a", first)
    fit(tmp_path / "b", second)
    assert first.selected == second.selected and first.snr == second.snr
    ranked = sorted(first.snr, key=first.snr.get, reverse=True)
    assert first.selected == ranked[:2]
    lowest = NoiseFiT(num_layers=2, snr="lowest", seed=5)
    fit(tmp_path / "c", lowest)
    assert lowest.selected == sorted(lowest.snr, key=lowest.snr.get)[:2]


class Probe(pl.Callback):
    """Checks, in every phase, whether the NoiseFiT hooks change the model's output."""

    def __init__(self, noisefit: NoiseFiT) -> None:
        self.noisefit = noisefit
        self.changed: dict[str, list[bool]] = {"train": [], "val": []}

    def _check(self, pl_module, x, phase) -> None:
        with torch.no_grad():
            before = pl_module(x)
            again = pl_module(x)
        self.changed[phase].append(not torch.equal(before, again))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check(pl_module, batch[0], "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        self._check(pl_module, batch[0], "val")


def test_noise_only_inside_the_training_steps_noisy_passes(tmp_path) -> None:
    noisefit = NoiseFiT(num_layers=2)
    probe = Probe(noisefit)
    model, trainer = fit(tmp_path, noisefit, callbacks=[noisefit, probe])
    # Outside the two noisy passes the hooks are there but pass the output through.
    assert probe.changed["train"] and not any(probe.changed["train"])
    assert probe.changed["val"] and not any(probe.changed["val"])
    x = torch.randn(2, 1, 8, 8)
    noisefit._register(model)  # the handles were removed at the end of fit
    model.eval()
    with torch.no_grad():
        clean = model(x)
        with noisefit.noisy(0):
            noisy = model(x)
    assert not torch.equal(clean, noisy)
    # transform_loss outside training mode leaves the loss alone.
    loss = torch.tensor(1.0)
    assert noisefit.transform_loss(model, loss, clean, lambda: model(x)) is loss
    metrics = trainer.callback_metrics
    assert {"noisefit/ce", "noisefit/soft", "noisefit/consistency"} <= set(metrics)


def test_bad_setups_fail_at_setup_naming_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="only 3 candidate layers"):
        fit(tmp_path, NoiseFiT(num_layers=4))
    trainer = make_trainer(tmp_path, [NoiseFiT()], max_steps=1)
    resnet = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="pass the blocks' module names"):
        trainer.fit(resnet, datamodule=digits())

    class Plain(pl.LightningModule):
        def training_step(self, batch, batch_idx):  # pragma: no cover - never reached
            return None

        def configure_optimizers(self):  # pragma: no cover - never reached
            return None

    with pytest.raises(ValueError, match="NoiseFiTMixin"):
        make_trainer(tmp_path, [NoiseFiT()], max_steps=1).fit(Plain(), datamodule=digits())
    for kwargs, match in [
        (dict(num_layers=0), "num_layers"),
        (dict(snr="highest"), "snr must be"),
        (dict(alpha=1.5), "alpha must be in"),
        (dict(temperature=0.0), "temperature must be in"),
        (dict(calibration_passes=0), "calibration_passes"),
    ]:
        with pytest.raises(ValueError, match=match):
            NoiseFiT(**kwargs)
