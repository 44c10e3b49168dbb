"""CausalLMModule under DDP and FSDP2 on two CPU processes, and compiled with torch.compile.

The module doubles as the two-process script (as tests/test_fsdp.py, via tests/_ddp.py):
``python test_causal_lm_distributed.py FILES_DIR``; rank 0 writes what the test compares. One
spawn trains the tiny saved Llama of tests/_hf.py under DDP and under FSDP2
(``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, the blocks sharded
by :meth:`CausalLMModule.configure_model`) with

* NoiseFiT + SmallLossSelection,
* KernelSwap(fused_head=True) + SAM,
* LoRA adapters (peft),

each for the same steps on the same data: PromptResponseDataModule gives each rank its own
disjoint shard of the epoch's order from the data-parallel rank, which is the same under both
strategies, so the two runs must end with equal weights (float tolerance).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("transformers")

STEPS = 3  # 16 pairs, batches of 4 per rank: 2 batches an epoch per rank; 3 steps cross it

CONFIGS = ("noisefit", "fused_sam", "lora")


def _callbacks(name: str) -> list[pl.Callback]:
    from lightning_noise.callbacks import SAM, KernelSwap, NoiseFiT, SmallLossSelection

    if name == "noisefit":
        return [
            NoiseFiT(num_layers=2, calibration_passes=2),
            SmallLossSelection(forget_rate=0.25, num_gradual=1),
        ]
    if name == "fused_sam":
        return [KernelSwap(fused_head=True, impl="torch"), SAM(rho=0.05)]
    return []


def _module(files: Path, name: str, **kwargs):
    from lightning_noise.models import CausalLMModule

    lora = {"lora_r": 4, "lora_alpha": 8} if name == "lora" else {}
    return CausalLMModule(
        str(files / "model"),
        # SGD: AdamW's first steps move each weight by about lr * sign(gradient), which turns
        # rounding differences of near-zero gradients into differences of lr
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        **lora,
        **kwargs,
    )


def _data(files: Path):
    from lightning_noise.data import PromptResponseDataModule

    return PromptResponseDataModule(str(files / "train.jsonl"), str(files / "model"), batch_size=4)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters (all-gathered under FSDP2: call on every rank) and their trainability."""
    out = {}
    for name, p in module.named_parameters():
        value = p.detach()
        out[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def distributed_main(files: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    warnings.filterwarnings("ignore")
    files = Path(files)
    results: dict = {}
    for name in CONFIGS:
        for kind in ("ddp", "fsdp"):
            pl.seed_everything(0, verbose=False)
            lm = _module(files, name)
            if kind == "ddp":
                strategy = "ddp"
            else:
                strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
            callbacks = _callbacks(name)
            trainer = pl.Trainer(
                accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
                callbacks=callbacks, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=files,
                limit_val_batches=0, num_sanity_val_steps=0,
            )  # fmt: skip
            trainer.fit(lm, datamodule=_data(files))
            blocks = [
                n
                for n, m in lm.model.named_modules()
                if type(m).__name__ == "FSDPLlamaDecoderLayer"
            ]
            results[f"{kind}_{name}"] = {
                "params": full_state(lm),
                "trainable": sorted(n for n, p in lm.named_parameters() if p.requires_grad),
                "steps": trainer.global_step,
                "sharded_blocks": blocks,
                "dtensor": type(next(lm.parameters())).__name__,
                "noisefit": next(
                    (list(c.selected) for c in callbacks if hasattr(c, "selected")), None
                ),
                "kept": float(trainer.callback_metrics.get("train/kept_fraction", -1.0)),
            }
    if torch.distributed.get_rank() == 0:
        torch.save(results, files / "distributed.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import _hf

    root = tmp_path_factory.mktemp("hf_dist")
    _hf.write_model(root / "model")
    _hf.write_pairs(root / "train.jsonl")
    return root


def _close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name, **tol)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(1200)
def test_hf_model_under_fsdp2_equals_ddp_and_lora_trains_only_adapters(files) -> None:
    pytest.importorskip("peft")
    from _ddp import run_ddp_script

    run_ddp_script(__file__, files, timeout=1100)
    r = torch.load(files / "distributed.pt", weights_only=True)
    start = full_state(_module(files, "noisefit"))
    for name in CONFIGS:
        ddp, fsdp = r[f"ddp_{name}"], r[f"fsdp_{name}"]
        assert ddp["steps"] == fsdp["steps"] == STEPS, name
        # FSDP2 sharded each of the 4 blocks and the model (also inside peft's wrapper)
        assert fsdp["dtensor"] == "DTensor" and ddp["dtensor"] == "Parameter", name
        assert len(fsdp["sharded_blocks"]) == 4 and not ddp["sharded_blocks"], name
        _close(ddp["params"], fsdp["params"], rtol=1e-4, atol=1e-5)
        assert ddp["noisefit"] == fsdp["noisefit"], name
        assert ddp["kept"] == fsdp["kept"], name
    # The methods acted: NoiseFiT chose two blocks and the selection kept 3 of 4 pairs, the
    # weights moved, and the configurations end apart.
    assert len(r["ddp_noisefit"]["noisefit"]) == 2
    assert r["ddp_noisefit"]["kept"] == pytest.approx(0.75)
    key = "model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(r["ddp_noisefit"]["params"][key], start[key])
    assert not torch.allclose(r["ddp_noisefit"]["params"][key], r["ddp_fused_sam"]["params"][key])
    # LoRA under DDP (and FSDP2): only the adapters are trainable, and only they moved.
    lora = r["ddp_lora"]
    assert lora["trainable"] and all("lora_" in n for n in lora["trainable"])
    assert lora["trainable"] == r["fsdp_lora"]["trainable"]
    lora_start = full_state(_module(files, "lora"))
    moved = {n for n, p in lora["params"].items() if not torch.equal(p, lora_start[n])}
    assert moved and moved <= set(lora["trainable"])


#: The compile test's backend per configuration. NoiseFiT's noise hook runs outside the graph
#: (``torch.compiler.disable``): a break at each hooked block, the same graphs every step
#: (traced, its per-step seed made Dynamo recompile every step: 13 graphs and 13 minutes under
#: inductor on the loaded 2-core machine; disabled, 9 graphs and 2 minutes, equal to eager
#: within 5e-7). LIGHTNING_NOISE_COMPILE_BACKEND sets both (as in
#: tests/test_compiled_training.py).
BACKENDS = {"noisefit": "inductor", "fused_sam": "inductor"}


def _backend(name: str) -> str:
    return os.environ.get("LIGHTNING_NOISE_COMPILE_BACKEND", BACKENDS[name])


def _fit_one_process(files: Path, name: str, compile) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    lm = _module(files, name, compile=compile)
    trainer = pl.Trainer(
        max_steps=4, callbacks=_callbacks(name), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=files,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(lm, datamodule=_data(files))
    assert trainer.global_step == 4
    assert (lm.model._compiled_call_impl is not None) == bool(compile)
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ["noisefit", "fused_sam"])
def test_compiled_hf_model_trains_like_eager(files, name) -> None:
    """``CausalLMModule(compile=...)`` with NoiseFiT + SmallLossSelection, and with the fused
    head + loss and SAM: the compiled run ends where the eager run ends (float tolerance)."""
    import shutil

    backend = _backend(name)
    if backend == "inductor" and shutil.which("gcc") is None:
        pytest.skip("inductor compiles C++ with gcc on the CPU")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        eager = _fit_one_process(files, name, False)
        compiled = _fit_one_process(files, name, {"backend": backend})
        stats = torch._dynamo.utils.counters
        assert stats["stats"]["unique_graphs"] >= 1  # the model really ran compiled
        if name == "fused_sam":  # the fused head's hook and kernel trace without a break
            assert not stats["graph_break"], dict(stats["graph_break"])
        else:  # NoiseFiT: only its disabled hook breaks the graph (no per-step seed traced)
            reasons = list(stats["graph_break"])
            assert reasons and all("torch.compiler.disable" in r for r in reasons), reasons
    finally:
        torch._dynamo.reset()
    start = _module(files, name).state_dict()
    assert eager.keys() == compiled.keys() == start.keys()  # in place: the same keys
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-4, msg=key)
    key = "model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(eager[key], start[key])  # it trained


def test_configure_model_refuses_tensor_parallelism_and_leaves_other_strategies(files) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return SimpleNamespace(size=lambda: 2)

    lm = _module(files, "noisefit")
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    lm._device_mesh = Mesh()
    lm.trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2; use ModelParallelStrategy"):
        lm.configure_model()
    lm.trainer = SimpleNamespace(strategy=SimpleNamespace())  # DDP, one device: unchanged
    before = type(lm.model)
    lm.configure_model()
    assert type(lm.model) is before


if __name__ == "__main__":
    distributed_main(sys.argv[1])
