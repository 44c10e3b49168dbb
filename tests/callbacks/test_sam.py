"""SAM, ASAM and FSAM callbacks against plain-PyTorch references written from the papers.

The reference (`reference_sam_run`) follows the update of Foret et al. 2021 literally:
g = grad L(w); e = rho g / ||g||; g_SAM = grad L(w + e) with the BatchNorm statistics of the
first pass kept; restore w; base-optimizer step with g_SAM. ASAM (Kwon et al. 2021) uses
e = rho T^2 g / ||T g|| with T = |w| + eta on weights; FSAM (Zhong et al. 2022) multiplies e
by a top-k mask of g^2 (biases and BatchNorm parameters unmasked).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import SumMetric

from lightning_noise.callbacks.sam import (
    ASAM,
    FSAM,
    SAM,
    FisherSharpnessAwareMinimization,
    SharpnessAwareMinimization,
    fisher_mask,
)

STEPS = 20
BATCH = 16


def make_net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(16, 4),
    )


def make_data(n: int = STEPS * BATCH) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(x, y)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, loss_hook: Callable | None = None) -> None:
        super().__init__()
        self.net = make_net(dropout)
        self.calls = 0
        self.seen = SumMetric()
        self.loss_hook = loss_hook

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.loss_hook is not None:
            loss = self.loss_hook(self, loss)
        self.seen.update(torch.tensor(float(len(y))))
        self.log("seen", self.seen, on_step=False, on_epoch=True)
        self.log("train_loss", loss, on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.parameters())


def fit(callbacks, *, steps: int = STEPS, module: Net | None = None, **trainer_kwargs) -> Net:
    module = module or Net()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(make_data(), batch_size=BATCH, shuffle=False))
    module.trainer_ref = trainer
    return module


# ------------------------------------------------------------------------------ reference
def _bn_buffers(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in net.modules() if isinstance(m, nn.BatchNorm1d) for b in m.buffers()]


def _set_bn_buffers(net: nn.Module, saved: list[torch.Tensor]) -> None:
    it = iter(saved)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            for b in m.buffers():
                b.copy_(next(it))


def sam_epsilon(named, rho, *, adaptive=False, eta=0.01, masks=None):
    """e of SAM/ASAM/FSAM for named parameters with .grad, from the papers' equations."""
    ts = {}
    for n, p in named:
        ts[n] = (p.detach().abs() + eta) if adaptive and "weight" in n else torch.ones_like(p)
    norm = torch.sqrt(sum(((ts[n] * p.grad) ** 2).sum() for n, p in named))
    eps = {}
    for n, p in named:
        e = rho * ts[n] ** 2 * p.grad / (norm + 1e-12)
        if masks is not None and n in masks:
            e = e * masks[n]
        eps[n] = e
    return eps


def reference_sam_run(
    rho: float,
    *,
    adaptive: bool = False,
    steps: int = STEPS,
    clip: float | None = None,
    dropout: float = 0.0,
    mask_fn: Callable | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    torch.manual_seed(0)
    net = make_net(dropout).to(dtype)
    opt = make_optimizer(net.parameters())
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=False)
    masks = None

    def loss_of(x, y):
        if autocast_dtype is None:
            return F.cross_entropy(net(x), y)
        with torch.autocast("cpu", dtype=autocast_dtype):
            return F.cross_entropy(net(x), y)

    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x = x.to(dtype)
        opt.zero_grad()
        rng = torch.get_rng_state()
        loss = loss_of(x, y)
        (loss * scaler_scale if scaler_scale else loss).backward()
        if scaler_scale:
            for p in net.parameters():
                p.grad /= scaler_scale
        named = [(n, p) for n, p in net.named_parameters()]
        if mask_fn is not None:
            masks = mask_fn(step, named, masks)
        eps = sam_epsilon(named, rho, adaptive=adaptive, masks=masks)
        backup = {n: p.detach().clone() for n, p in named}
        bn = _bn_buffers(net)
        after_first = torch.get_rng_state()
        with torch.no_grad():
            for n, p in named:
                p.add_(eps[n])
        opt.zero_grad()
        torch.set_rng_state(rng)  # the same dropout masks as the first pass
        loss2 = loss_of(x, y)
        (loss2 * scaler_scale if scaler_scale else loss2).backward()
        if scaler_scale:
            for p in net.parameters():
                p.grad /= scaler_scale
        torch.set_rng_state(after_first)
        _set_bn_buffers(net, bn)  # BatchNorm statistics of the first pass only
        with torch.no_grad():
            for n, p in named:
                p.copy_(backup[n])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return net


def assert_same_state(module: Net, reference: nn.Module, atol: float = 1e-6) -> None:
    for (name, a), b in zip(
        module.net.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"{name} differs")


# ----------------------------------------------------------------------------------- tests
def test_sam_matches_reference_over_20_steps_with_batchnorm() -> None:
    module = fit([SAM(rho=0.05)])
    assert module.calls == 2 * STEPS  # a second pass really ran on every step
    assert_same_state(module, reference_sam_run(0.05))


def test_first_step_is_not_plain_sgd() -> None:
    """The trap of off-the-shelf SAM optimizers under Lightning: step 1 equal to SGD."""
    sam = fit([SAM(rho=0.5)], steps=1)
    sgd = fit([], steps=1)
    diff = max((a - b).abs().max() for a, b in zip(sam.parameters(), sgd.parameters(), strict=True))
    assert diff > 1e-4
    assert_same_state(sam, reference_sam_run(0.5, steps=1))


def test_asam_matches_reference() -> None:
    module = fit([ASAM(rho=0.5)])
    assert_same_state(module, reference_sam_run(0.5, adaptive=True))


def test_gradient_clipping_applies_to_the_sam_gradient() -> None:
    module = fit([SAM(rho=0.05)], gradient_clip_val=0.05)
    assert_same_state(module, reference_sam_run(0.05, clip=0.05))
    unclipped = reference_sam_run(0.05)
    assert any(
        (a - b).abs().max() > 1e-4
        for a, b in zip(module.net.parameters(), unclipped.parameters(), strict=True)
    )


def test_dropout_second_pass_replays_the_first_passs_randomness() -> None:
    module = fit([SAM(rho=0.05)], module=Net(dropout=0.5))
    assert_same_state(module, reference_sam_run(0.05, dropout=0.5))
    fresh = fit([SAM(rho=0.05, second_pass_rng="fresh")], module=Net(dropout=0.5))
    assert any(
        (a - b).abs().max() > 1e-5
        for a, b in zip(module.parameters(), fresh.parameters(), strict=True)
    )


def test_second_pass_neither_logs_nor_updates_metrics() -> None:
    module = fit([SAM(rho=0.05)], steps=5)
    metrics = module.trainer_ref.callback_metrics
    assert float(metrics["seen"]) == 5 * BATCH  # each sample counted once, not twice
    plain = fit([], steps=1)
    first_loss = float(plain.trainer_ref.callback_metrics["train_loss"])
    one = fit([SAM(rho=0.05)], steps=1)
    assert float(one.trainer_ref.callback_metrics["train_loss"]) == pytest.approx(first_loss)


def test_bf16_mixed_matches_autocast_reference() -> None:
    module = fit([SAM(rho=0.05)], precision="bf16-mixed", steps=5)
    assert_same_state(module, reference_sam_run(0.05, steps=5, autocast_dtype=torch.bfloat16))


def test_float64_matches_the_float64_reference() -> None:
    """precision="64-true": the norm is accumulated in float64 (it once asked float32 of
    float64 gradients and failed) and the run equals the reference to float64 rounding."""
    module = fit([SAM(rho=0.05)], precision="64-true", steps=5)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert_same_state(module, reference_sam_run(0.05, steps=5, dtype=torch.float64), atol=1e-12)


def _fp16_plugin(init_scale: float = 2.0**8) -> MixedPrecision:
    return MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale)
    )


def test_fp16_with_grad_scaler_matches_reference() -> None:
    module = fit([SAM(rho=0.05)], plugins=[_fp16_plugin()], steps=5)
    reference = reference_sam_run(0.05, steps=5, autocast_dtype=torch.float16, scaler_scale=2.0**8)
    assert_same_state(module, reference, atol=1e-5)


def test_fp16_non_finite_sam_gradient_skips_the_step() -> None:
    """An inf in the second pass: the step is skipped and the scale lowered, as the scaler would."""
    calls = {"n": 0}

    def poison(module, loss):
        calls["n"] += 1
        # call 6 is the second pass of step 3 (1-based calls: 1,2 step 1; 3,4 step 2; ...)
        return loss * float("inf") if calls["n"] == 6 else loss

    plugin = _fp16_plugin()
    snapshots = []

    class Snap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in pl_module.parameters()])

    module = fit([SAM(rho=0.05), Snap()], plugins=[plugin], steps=4, module=Net(loss_hook=poison))
    before_3, before_4 = snapshots[2], snapshots[3]
    for a, b in zip(before_3, before_4, strict=True):
        assert torch.equal(a, b)  # step 3 changed nothing
    assert plugin.scaler.get_scale() == 2.0**8 / 2  # lowered once, by backoff 0.5
    final = list(module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_4, final, strict=True))


def test_fp16_non_finite_first_gradient_skips_the_step() -> None:
    """A non-finite first gradient: the step is skipped and counted, without a host sync.

    The second pass still runs (deciding to skip it would read the gradient norm on the host
    every step, issue 14): 6 calls in 3 steps; its gradient stays non-finite, so the scaler
    skips the step and lowers the scale once, as before.
    """
    calls = {"n": 0}

    def poison(module, loss):
        calls["n"] += 1
        return loss * float("inf") if calls["n"] == 3 else loss  # first pass of step 2

    sam = SAM(rho=0.05)
    plugin = _fp16_plugin()
    module = fit([sam], plugins=[plugin], steps=3, module=Net(loss_hook=poison))
    assert sam.skipped_steps == 1 and module.calls == 6
    assert plugin.scaler.get_scale() == 2.0**8 / 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": -1.0}, "rho"),
        ({"eta": -0.1}, "eta"),
        ({"perturbation": "sync"}, "perturbation"),
        ({"second_pass_rng": "new"}, "second_pass_rng"),
    ],
)
def test_bad_hyperparameters(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SAM(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"),
     ({"mask_interval": 0}, "mask_interval")],
)  # fmt: skip
def test_bad_fsam_hyperparameters(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FSAM(**kwargs)


def test_gradient_accumulation_is_refused() -> None:
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2"):
        fit([SAM()], accumulate_grad_batches=2)


def test_manual_optimization_points_to_the_core() -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(RuntimeError, match="SharpnessAwareMinimization"):
        fit([SAM()], module=Manual())


def test_gradient_changing_callback_before_sam_is_refused() -> None:
    class Noise(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass

    with pytest.raises(RuntimeError, match="list SAM before Noise"):
        fit([Noise(), SAM()])
    fit([SAM(), Noise()], steps=1)  # the other order is fine


def test_core_in_manual_optimization_matches_the_callback() -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.sam = SharpnessAwareMinimization(self.named_parameters(), rho=0.05)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            self.sam.ascent()
            bn = _bn_buffers(self.net)
            self.manual_backward(F.cross_entropy(self(x), y))
            _set_bn_buffers(self.net, bn)
            self.sam.restore()
            opt.step()

    manual = fit([], module=Manual())
    assert_same_state(manual, reference_sam_run(0.05))


# --------------------------------------------------------------------------------- FSAM
def test_fisher_mask_keeps_the_global_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(30, 7, generator=g), torch.randn(11, generator=g)]
    masks = fisher_mask(grads, keep_ratio=0.1)
    assert all(m.dtype == torch.bool for m in masks)
    flat = torch.cat([x.reshape(-1) for x in grads]).pow(2)
    keep = int(flat.numel() * 0.1)
    threshold = flat.sort(descending=True).values[keep - 1]
    chosen = torch.cat([m.reshape(-1) for m in masks])
    assert int(chosen.sum()) == keep
    assert torch.equal(chosen, flat >= threshold)


def test_fsam_core_masks_weights_but_not_biases_or_listed_params() -> None:
    net = make_net()
    core = FisherSharpnessAwareMinimization(
        net.named_parameters(), rho=0.05, keep_ratio=0.2, always_perturbed={"1.weight"}
    )
    F.cross_entropy(net(make_data(32).tensors[0]), make_data(32).tensors[1]).backward()
    core.update_mask()
    names = [n for n, _ in net.named_parameters()]
    masked = {n for n, m in zip(names, core.masks, strict=True) if m is not None}
    assert masked == {"0.weight", "4.weight"}


def _fsam_masks(keep_ratio: float, interval: int, bn_names: set[str]):
    def mask_fn(step, named, masks):
        if step % interval != 0 and masks is not None:
            return masks
        chosen = [(n, p) for n, p in named if "bias" not in n and n not in bn_names]
        flat = torch.cat([p.grad.reshape(-1) ** 2 for _, p in chosen])
        keep = int(flat.numel() * keep_ratio)
        top = torch.zeros_like(flat, dtype=torch.bool)
        top[torch.topk(flat, keep).indices] = True
        out, start = {}, 0
        for n, p in chosen:
            out[n] = top[start : start + p.numel()].view_as(p).float()
            start += p.numel()
        return out

    return mask_fn


def test_fsam_matches_reference_with_mask_updates() -> None:
    fsam = FSAM(rho=0.1, keep_ratio=0.1, mask_interval=5)
    module = fit([fsam], steps=12)
    reference = reference_sam_run(
        0.1, steps=12, mask_fn=_fsam_masks(0.1, 5, {"1.weight", "1.bias"})
    )
    assert_same_state(module, reference)
    masked = [m for m in fsam.masks if m is not None]
    assert masked and all(m.dtype == torch.bool for m in masked)
    # Not a no-op: a mask that never updates after step 0 gives another result.
    stale = reference_sam_run(0.1, steps=12, mask_fn=_fsam_masks(0.1, 1000, {"1.weight", "1.bias"}))
    assert any(
        (a - b).abs().max() > 1e-6
        for a, b in zip(module.net.parameters(), stale.parameters(), strict=True)
    )


# ------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "make", [lambda: SAM(rho=0.05), lambda: ASAM(), lambda: FSAM(mask_interval=1000)],
    ids=["SAM", "ASAM", "FSAM"],
)  # fmt: skip
def test_resume_is_exact(tmp_path, make) -> None:
    def run(max_steps, ckpt=None):
        module = Net()
        cb = make()
        trainer = pl.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
        )  # fmt: skip
        loader = DataLoader(make_data(), batch_size=BATCH, shuffle=False)
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module, cb

    straight, cb_straight = run(12)
    half, _ = run(6)
    resumed, cb_resumed = run(12, ckpt=tmp_path / "last.ckpt")
    assert_same_state(resumed, straight.net, atol=0)
    assert not torch.equal(half.net[0].weight, straight.net[0].weight)
    assert cb_resumed.state_dict().keys() == cb_straight.state_dict().keys()
    if isinstance(cb_straight, FSAM):  # the mask from step 0 came back from the checkpoint
        for a, b in zip(cb_straight.masks, cb_resumed.masks, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_presets_build_from_yaml() -> None:
    from lightning_noise.cli import build_cli

    root = Path(__file__).resolve().parents[2]
    for preset, cls in (("sam", SAM), ("asam", ASAM), ("fsam", FSAM)):
        cli = build_cli(
            [
                "--config", str(root / "recipes" / "digits_baseline.yaml"),
                f"--trainer.callbacks+={root / 'configs' / 'callbacks' / f'{preset}.yaml'}",
            ],
            run=False,
        )  # fmt: skip
        assert any(type(cb) is cls for cb in cli.trainer.callbacks), preset


# ---------------------------------------------------------------------------------- DDP
def _ddp_main(out_dir: str) -> None:
    """Run under DDP on two CPU processes; each rank writes its parameters."""
    for mode in ("global", "local"):
        module = Net()
        trainer = pl.Trainer(
            max_steps=8, accelerator="cpu", devices=2, strategy="ddp", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[SAM(rho=0.05, perturbation=mode)], use_distributed_sampler=False,
        )  # fmt: skip
        rank = int(os.environ.get("LOCAL_RANK", 0))
        data = make_data(8 * 2 * BATCH)
        shard = torch.utils.data.Subset(data, list(range(rank, len(data), 2)))
        trainer.fit(module, DataLoader(shard, batch_size=BATCH, shuffle=False))
        state = {k: v.tolist() for k, v in module.net.state_dict().items()}
        Path(out_dir, f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(state))
        trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


def reference_ddp(rho: float, mode: str, steps: int = 8) -> nn.Module:
    """Two replicas' batches; gradients averaged as DDP does; e global or per replica."""
    torch.manual_seed(0)
    net = make_net()
    opt = make_optimizer(net.parameters())
    data = make_data(steps * 2 * BATCH)
    xs = [data.tensors[0][r::2] for r in range(2)]
    ys = [data.tensors[1][r::2] for r in range(2)]
    named = list(net.named_parameters())

    def grads_of(x, y, *, track: bool):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = track
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = True
        return {n: p.grad.clone() for n, p in named}

    for step in range(steps):
        batch = [(x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH])
                 for x, y in zip(xs, ys, strict=True)]  # fmt: skip
        # DDP broadcasts rank 0's buffers before each forward: rank 0's BN statistics win.
        local = [grads_of(*batch[0], track=True), grads_of(*batch[1], track=False)]
        mean = {n: (local[0][n] + local[1][n]) / 2 for n, _ in named}
        backup = {n: p.detach().clone() for n, p in named}
        second = []
        for r in range(2):
            g = mean if mode == "global" else local[r]
            for n, p in named:
                p.grad = g[n]
            eps = sam_epsilon(named, rho)
            with torch.no_grad():
                for n, p in named:
                    p.copy_(backup[n] + eps[n])
            second.append(grads_of(*batch[r], track=False))
            with torch.no_grad():
                for n, p in named:
                    p.copy_(backup[n])
        for n, p in named:
            p.grad = (second[0][n] + second[1][n]) / 2
        opt.step()
    return net


@pytest.mark.ddp
def test_ddp_matches_reference_and_replicas_agree(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    for mode in ("global", "local"):
        ranks = [json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1], f"{mode}: replicas diverged"
        reference = reference_ddp(0.05, mode)
        for (name, ref), value in zip(
            reference.state_dict().items(), ranks[0].values(), strict=True
        ):
            torch.testing.assert_close(
                torch.tensor(value, dtype=ref.dtype), ref, rtol=0, atol=1e-6,
                msg=f"{mode}: {name} differs",
            )  # fmt: skip
    # Global and local perturbations are different methods: different results.
    g = json.loads((tmp_path / "global_rank0.json").read_text())
    loc = json.loads((tmp_path / "local_rank0.json").read_text())
    assert g != loc


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
