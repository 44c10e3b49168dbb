"""Tests for gradient noise (Neelakantan et al. 2015): schedule, statistics, Trainer behaviour.

The DDP test runs this file as a script (``python test_gradient_noise.py OUT_DIR``) with
``strategy="ddp"`` on two CPU processes; Lightning relaunches the script for rank 1.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _trainers import make_trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_noise.callbacks.gradient_noise import (
    GradientNoise,
    add_gradient_noise,
    gradient_noise_std,
    noise_seed,
)

ROOT = Path(__file__).resolve().parents[2]
NUM_FEATURES = 3


class FeatureDataset(Dataset):
    """Fixed random features and targets; yields ``(x, y, index)`` like the project's data."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, NUM_FEATURES, generator=gen)
        self.y = torch.randint(2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class LinearLoss(pl.LightningModule):
    """A loss linear in the parameters, so the gradient depends on the batch only.

    With and without noise the runs then see identical gradients, and with SGD the difference
    of the final parameters is exactly ``-lr`` times the sum of the noise of every step. The
    ``unused`` parameter never gets a gradient (``.grad`` stays None): it must get no noise.
    """

    def __init__(self, lr: float = 1.0, manual: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(NUM_FEATURES, 4, generator=gen))
        self.unused = nn.Parameter(torch.randn(5, generator=gen))
        self.bias = nn.Parameter(torch.randn(4, generator=gen))
        self.lr = lr
        self.automatic_optimization = not manual

    def loss(self, x: Tensor) -> Tensor:
        return (x @ self.weight).sum(1).mean() + self.bias.sum() * x.mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch[0])
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyMLP(pl.LightningModule):
    """A small nonlinear classifier, for resume and DDP."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*GradScaler.*")
        yield


def noise_like(params, step: int, *, eta: float, gamma: float, seed: int) -> list[Tensor]:
    """The noise the core draws at ``step`` for ``params``, in their order.

    It is what the core adds to zero gradients of copies. A parameter named ``unused`` (see
    ``LinearLoss``) never has a gradient: it takes no part in the draw and gets zero noise.
    """
    copies = []
    for name, p in params:
        copy = torch.zeros_like(p, requires_grad=True)
        copy.grad = None if name == "unused" else torch.zeros_like(p)
        copies.append(copy)
    std = gradient_noise_std(step, eta=eta, gamma=gamma)
    add_gradient_noise(copies, std, generator_seed=noise_seed(seed, step))
    return [torch.zeros_like(c) if c.grad is None else c.grad for c in copies]


def params_after(model: pl.LightningModule) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("eta", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("step", [0, 1, 9, 1000])
def test_std_squared_is_the_papers_variance(eta, step) -> None:
    gamma = 0.55
    variance = eta * (1.0 + step) ** (-gamma)  # sigma_t^2 = eta / (1 + t)^gamma
    std = gradient_noise_std(step, eta=eta, gamma=gamma)
    assert std**2 == pytest.approx(variance, rel=1e-12)
    assert std == pytest.approx(math.sqrt(variance), rel=1e-12)
    assert gradient_noise_std(step + 1, eta=eta, gamma=gamma) < std  # annealed
    assert GradientNoise(eta=eta, gamma=gamma).std(step) == std


def test_zero_gamma_keeps_the_variance_constant() -> None:
    stds = [gradient_noise_std(t, eta=0.3, gamma=0.0) for t in (0, 5, 10_000)]
    assert stds == pytest.approx([math.sqrt(0.3)] * 3)


# ------------------------------------------------------------------------------ statistics
N_ELEMENTS = 200_000


@pytest.mark.parametrize("draw", ["generator", "counter"])
def test_noise_has_the_scheduled_mean_and_variance(draw) -> None:
    eta, gamma, step = 0.3, 0.55, 10
    big = torch.zeros(400, 500, requires_grad=True)  # 200,000 elements
    other = torch.zeros(N_ELEMENTS, requires_grad=True)
    big.grad, other.grad = torch.zeros_like(big), torch.zeros_like(other)
    std = gradient_noise_std(step, eta=eta, gamma=gamma)
    add_gradient_noise([big, other], std, generator_seed=noise_seed(3, step), draw=draw)
    variance = eta / (1 + step) ** gamma

    # For n i.i.d. normal samples the sample variance s^2 satisfies (n-1) s^2 / sigma^2 ~
    # chi2(n-1), so s^2 / sigma^2 has mean 1 and standard error sqrt(2 / (n-1)) (~0.0032 here).
    # Five standard errors: a false failure has probability ~6e-7.
    for noise in (big.grad.flatten().double(), other.grad.double()):
        n = noise.numel()
        assert n == N_ELEMENTS
        rel_se = math.sqrt(2.0 / (n - 1))
        sample_var = float(noise.var())
        assert abs(sample_var / variance - 1.0) < 5 * rel_se
        assert abs(float(noise.mean())) < 5 * math.sqrt(variance / n)
        # The common bug uses the variance formula as the std: its variance would be the
        # square, 12x smaller here, i.e. hundreds of standard errors away.
        buggy_variance = variance**2
        assert abs(sample_var / buggy_variance - 1.0) > 100 * rel_se
    # Independent elements: two parameters (and two halves of one) are uncorrelated.
    a, b = big.grad.flatten().double(), other.grad.double()
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(N_ELEMENTS)
    half = N_ELEMENTS // 2
    correlation = float(torch.corrcoef(torch.stack([a[:half], a[half:]]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(half)


def test_noise_is_added_to_existing_gradients_and_none_is_skipped() -> None:
    w = torch.zeros(50, requires_grad=True)
    w.grad = torch.arange(50.0)
    skipped = torch.zeros(7, requires_grad=True)
    zero = torch.zeros(50, requires_grad=True)
    zero.grad = torch.zeros(50)
    add_gradient_noise([skipped, w], 0.7, generator_seed=11)
    # The noise of a parameter depends on its position in the list, not on whether the ones
    # before it have a gradient this step.
    with_grad = torch.zeros(7, requires_grad=True)
    with_grad.grad = torch.zeros(7)
    add_gradient_noise([with_grad, zero], 0.7, generator_seed=11)
    assert skipped.grad is None
    torch.testing.assert_close(w.grad - torch.arange(50.0), zero.grad)
    assert float(zero.grad.abs().min()) > 0


def test_auto_draw_is_the_generator_for_plain_tensors_and_counter_differs() -> None:
    """``draw="auto"`` on ordinary gradients is the generator draw; the counter-based draw
    (what a sharded gradient gets) is another, equally valid, sequence."""
    grads = {}
    for draw in ("auto", "generator", "counter"):
        w = torch.zeros(64, 33, requires_grad=True)
        w.grad = torch.zeros_like(w)
        add_gradient_noise([w], 1.0, generator_seed=noise_seed(5, 2), draw=draw)
        grads[draw] = w.grad
    assert torch.equal(grads["auto"], grads["generator"])
    assert not torch.allclose(grads["counter"], grads["generator"])
    with pytest.raises(ValueError, match="draw"):
        add_gradient_noise([w], 1.0, generator_seed=0, draw="philox")


# ------------------------------------------------------------------------------ determinism
def _draw(seed: int, step: int, shapes=((30, 20), (17,))) -> list[Tensor]:
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    add_gradient_noise(params, 1.0, generator_seed=noise_seed(seed, step))
    return [p.grad for p in params]


def test_same_seed_and_step_give_the_same_noise_and_the_global_rng_is_untouched() -> None:
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    first = _draw(0, 5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = _draw(0, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for other in (_draw(0, 6), _draw(1, 5), _draw(1, 4)):
        assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Each parameter gets its own part of the stream, not a repeat of the first one.
    assert not torch.equal(first[0].flatten()[:17], first[1])


def test_noise_seed_is_a_63_bit_function_of_seed_and_step() -> None:
    seeds = {noise_seed(seed, step) for seed in range(20) for step in range(50)}
    assert len(seeds) == 1000  # (seed, step) and (seed + 1, step - 1) do not collide
    assert all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(7, 3) == noise_seed(7, 3)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": 0.0}, r"eta must be in \(0, inf\), got 0\.0"),
        ({"eta": -0.3}, r"eta .*got -0\.3"),
        ({"eta": float("nan")}, r"eta .*got nan"),
        ({"eta": float("inf")}, r"eta .*got inf"),
        ({"eta": True}, r"eta .*got True"),
        ({"eta": "0.3"}, r"eta .*got '0\.3'"),
        ({"gamma": -0.55}, r"gamma must be in \[0, inf\), got -0\.55"),
        ({"gamma": float("nan")}, r"gamma .*got nan"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"seed": 1.5}, r"seed .*got 1\.5"),
        ({"seed": True}, r"seed .*got True"),
    ],
)
def test_bad_hyperparameters_raise_with_the_value(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNoise(**kwargs)


def test_core_functions_validate_their_inputs() -> None:
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got -1"):
        gradient_noise_std(-1, eta=0.3, gamma=0.55)
    with pytest.raises(ValueError, match=r"eta .*got 0"):
        gradient_noise_std(0, eta=0, gamma=0.55)
    with pytest.raises(ValueError, match=r"std must be in \[0, inf\), got -0\.1"):
        add_gradient_noise([], -0.1, generator_seed=0)
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        add_gradient_noise(emb.parameters(), 0.1, generator_seed=0)


def test_state_dict_round_trip_and_state_key(tmp_path) -> None:
    callback = GradientNoise(eta=1.0, gamma=0.5, seed=4)
    callback.last_step = 17
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    restored = GradientNoise(eta=1.0, gamma=0.5, seed=4)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (
        restored.state_dict()
        == callback.state_dict()
        == {
            "eta": 1.0,
            "gamma": 0.5,
            "seed": 4,
            "last_step": 17,
        }
    )
    assert callback.state_key == restored.state_key
    assert "GradientNoise" in callback.state_key and "seed" in callback.state_key
    assert GradientNoise(eta=0.3).state_key != GradientNoise(eta=1.0).state_key


# ------------------------------------------------------------------------------ in a Trainer
ETA, GAMMA, SEED = 0.3, 0.55, 5


def _fit_linear(tmp_path, callbacks, *, manual=False, **trainer_kwargs) -> LinearLoss:
    model = LinearLoss(manual=manual)
    trainer = make_trainer(tmp_path, callbacks, **trainer_kwargs)
    trainer.fit(model, DataLoader(FeatureDataset(8), batch_size=2))
    return model


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_update_differs_exactly_by_the_noise_of_each_step(tmp_path, manual) -> None:
    # Automatic: 4 batches per epoch, accumulate 2 -> 2 optimizer steps per epoch, 2 epochs:
    # t = 0..3, noise once per optimizer step. Manual: one step per batch, t = 0..7.
    kwargs = {"max_epochs": 2}
    if not manual:
        kwargs["accumulate_grad_batches"] = 2
    steps = 8 if manual else 4
    callback = GradientNoise(eta=ETA, gamma=GAMMA, seed=SEED)
    noisy = _fit_linear(tmp_path / "noisy", [callback], manual=manual, **kwargs)
    plain = _fit_linear(tmp_path / "plain", [], manual=manual, **kwargs)

    total = [torch.zeros_like(p) for p in noisy.parameters()]
    for step in range(steps):
        for acc, n in zip(
            total,
            noise_like(noisy.named_parameters(), step, eta=ETA, gamma=GAMMA, seed=SEED),
            strict=True,
        ):
            acc += n
    for name, a, b, n in zip(
        [name for name, _ in noisy.named_parameters()],
        params_after(noisy),
        params_after(plain),
        total,
        strict=True,
    ):
        torch.testing.assert_close(a - b, -noisy.lr * n, rtol=0, atol=2e-6, msg=name)
    assert not torch.equal(noisy.weight, plain.weight)
    torch.testing.assert_close(noisy.unused, plain.unused, rtol=0, atol=0)  # no grad, no noise
    assert callback.last_step == steps - 1
    logged = noisy.trainer.callback_metrics["gradient_noise/std"]
    assert float(logged) == pytest.approx(gradient_noise_std(steps - 1, eta=ETA, gamma=GAMMA))


def test_noise_is_added_before_gradient_clipping(tmp_path) -> None:
    clip = 0.05
    x = FeatureDataset(8).x[:4]
    model = LinearLoss()
    p0 = params_after(model)
    # By hand (SGD, lr=1): the first batch's gradient plus the noise of step 0, clipped by the
    # total norm exactly as torch.nn.utils.clip_grad_norm_ does (coefficient clamped to 1).
    model.loss(x).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    noise = noise_like(model.named_parameters(), 0, eta=ETA, gamma=GAMMA, seed=SEED)
    noisy = [None if g is None else g + n for g, n in zip(grads, noise, strict=True)]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in noisy if g is not None]))
    coef = min(1.0, clip / (float(norm) + 1e-6))
    expected = [p - coef * (0 if g is None else g) for p, g in zip(p0, noisy, strict=True)]

    model.zero_grad(set_to_none=True)
    trainer = make_trainer(
        tmp_path,
        [GradientNoise(eta=ETA, gamma=GAMMA, seed=SEED)],
        max_steps=1,
        gradient_clip_val=clip,
    )
    trainer.fit(model, DataLoader(FeatureDataset(8), batch_size=4))
    after = params_after(model)
    for a, e in zip(after, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
    update = torch.cat([(a - p).flatten() for a, p in zip(after, p0, strict=True)])
    assert float(torch.linalg.vector_norm(update)) <= clip * (1 + 1e-5)  # the bound holds
    assert coef < 0.1  # the clip was active
    # The other order (clip, then add noise) gives a different, unbounded update.
    g_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None]))
    g_coef = min(1.0, clip / (float(g_norm) + 1e-6))
    other = [
        p - (0 if g is None else g_coef * g + n) for p, g, n in zip(p0, grads, noise, strict=True)
    ]
    assert not torch.allclose(after[0], other[0], atol=1e-3)


def test_amp_16_mixed_noise_is_on_unscaled_gradients(tmp_path) -> None:
    # CPU fp16 autocast with a GradScaler stands in for CUDA AMP: Lightning's MixedPrecision
    # plugin unscales before on_before_optimizer_step on any device.
    # A modest initial scale: the default 2^16 overflows fp16 here and the step is skipped.
    def amp():
        return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=256.0))

    callback = GradientNoise(eta=ETA, gamma=GAMMA, seed=SEED)
    noisy = _fit_linear(tmp_path / "noisy", [callback], plugins=[amp()], max_steps=1)
    plain = _fit_linear(tmp_path / "plain", [], plugins=[amp()], max_steps=1)
    noise = noise_like(noisy.named_parameters(), 0, eta=ETA, gamma=GAMMA, seed=SEED)
    assert noisy.trainer.precision_plugin.scaler.get_scale() == 256.0  # scaled, no skipped step
    for a, b, n in zip(params_after(noisy), params_after(plain), noise, strict=True):
        torch.testing.assert_close(a - b, -n, rtol=0, atol=2e-6)


def test_fused_optimizer_under_16_mixed_fails_clearly(tmp_path) -> None:
    class Fused(LinearLoss):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0, fused=True)

    trainer = make_trainer(
        tmp_path,
        [GradientNoise()],
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))],
    )
    with pytest.raises(RuntimeError, match=r"non-fused optimizer or precision='bf16-mixed'"):
        trainer.fit(Fused(), DataLoader(FeatureDataset(8), batch_size=2))


def test_sharded_strategy_fails_clearly_at_setup() -> None:
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    GradientNoise().setup(trainer, LinearLoss(), "fit")  # single device: fine
    fake = type("FakeTrainer", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(RuntimeError, match=r"FSDPStrategy.*strategy='ddp'"):
        GradientNoise().setup(fake, LinearLoss(), "fit")


# ------------------------------------------------------------------------------ resume
def _fit_mlp(root, max_epochs: int, callbacks, *, seed: int = 0, ckpt_path=None, save_to=None):
    pl.seed_everything(seed, verbose=False)
    model = TinyMLP(lr=0.5)
    trainer = make_trainer(root, callbacks, max_epochs=max_epochs)
    trainer.fit(model, DataLoader(FeatureDataset(32), batch_size=8), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model


def test_resume_from_checkpoint_is_exact(tmp_path) -> None:
    straight_cb = GradientNoise(eta=1.0, seed=3)
    straight = _fit_mlp(tmp_path / "a", 4, [straight_cb])

    ckpt = tmp_path / "half.ckpt"
    half_cb = GradientNoise(eta=1.0, seed=3)
    _fit_mlp(tmp_path / "b", 2, [half_cb], save_to=ckpt)
    half_state = half_cb.state_dict()
    # Another global seed: the resumed run must not depend on the global RNG.
    resumed_cb = GradientNoise(eta=1.0, seed=3)
    resumed = _fit_mlp(tmp_path / "c", 4, [resumed_cb], seed=1, ckpt_path=ckpt)

    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed_cb.state_dict() == straight_cb.state_dict()
    assert half_state["last_step"] == 7 and straight_cb.last_step == 15  # 4 steps per epoch
    # The noise mattered: training without it ends elsewhere.
    plain = _fit_mlp(tmp_path / "d", 4, [])
    assert not torch.allclose(plain.net[0].weight, straight.net[0].weight, atol=1e-3)


# ------------------------------------------------------------------------------ YAML preset
def test_yaml_preset_appends_to_a_recipe(tmp_path) -> None:
    from lightning_noise.callbacks import GradientNoise as Exported
    from lightning_noise.cli import build_cli
    from lightning_noise.dynamics import TrainingDynamics

    cli = build_cli(
        [
            "--config",
            str(ROOT / "recipes" / "digits_baseline.yaml"),
            f"--trainer.callbacks+={ROOT / 'configs' / 'callbacks' / 'gradient_noise.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet",
            "--data.init_args.image_size=16",
        ],
        run=False,
    )
    noise = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientNoise)]
    assert Exported is GradientNoise
    assert len(noise) == 1 and noise[0].state_dict()["eta"] == pytest.approx(0.3)
    assert noise[0].gamma == pytest.approx(0.55)
    # Appended: the recipe's own callbacks are still there.
    assert any(isinstance(cb, TrainingDynamics) for cb in cli.trainer.callbacks)


# ------------------------------------------------------------------------------ DDP
DDP_N, DDP_BATCH, DDP_EPOCHS = 16, 4, 2
DDP_SHARDS = (list(range(0, 8)), list(range(8, 16)))  # rank r reads its own half, in order


def shard_batches(shard: list[int]) -> list[list[int]]:
    return [shard[i : i + DDP_BATCH] for i in range(0, len(shard), DDP_BATCH)]


def ddp_main(out_dir: str) -> None:
    """Entry point of both ranks: train with noise and save each rank's parameters."""
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = TinyMLP()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=DDP_EPOCHS,
        callbacks=[GradientNoise(eta=1.0, seed=2)],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    loader = DataLoader(
        FeatureDataset(DDP_N), batch_sampler=shard_batches(DDP_SHARDS[trainer.global_rank])
    )
    trainer.fit(model, loader)
    torch.save(model.state_dict(), Path(out_dir, f"rank{trainer.global_rank}.pt"))
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_replicas_get_the_same_noise_and_match_one_process(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # replicas did not diverge

    # One process whose batch at each step is both ranks' batches together: DDP averages the
    # two equal-size batch means, i.e. the mean over the union, and the noise is added once.
    order = [a + b for a, b in zip(*map(shard_batches, DDP_SHARDS), strict=True)]

    def single(callbacks) -> TinyMLP:
        pl.seed_everything(0, verbose=False)
        model = TinyMLP()
        trainer = make_trainer(tmp_path / "single", callbacks, max_epochs=DDP_EPOCHS)
        trainer.fit(model, DataLoader(FeatureDataset(DDP_N), batch_sampler=order))
        return model

    one = single([GradientNoise(eta=1.0, seed=2)]).state_dict()
    for name, value in ranks[0].items():
        torch.testing.assert_close(value, one[name], rtol=0, atol=1e-5, msg=name)
    plain = single([]).state_dict()
    assert not torch.allclose(plain["net.0.weight"], one["net.0.weight"], atol=1e-3)


if __name__ == "__main__":
    ddp_main(sys.argv[1])
