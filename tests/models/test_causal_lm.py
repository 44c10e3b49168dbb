"""CausalLMModule: answer-only token losses, the fused head, LoRA, NoiseFiT, sample selection."""

from __future__ import annotations

import doctest
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import _hf

import lightning_noise.models.causal_lm as causal_lm_module
from lightning_noise.callbacks import KernelSwap, NoiseFiT, SmallLossSelection
from lightning_noise.data import PromptResponseDataModule
from lightning_noise.losses import LabelSmoothingCrossEntropy, MaxSupLoss
from lightning_noise.models import CausalLMModule


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _hf.write_model(root / "model")
    _hf.write_pairs(root / "train.jsonl")
    return root


def _data(files, **kwargs) -> PromptResponseDataModule:
    return PromptResponseDataModule(
        str(files / "train.jsonl"), str(files / "model"), batch_size=4, **kwargs
    )


def test_doctests() -> None:
    assert doctest.testmod(causal_lm_module, raise_on_error=True).failed == 0


def test_loss_is_the_mean_over_pairs_of_the_answer_tokens_cross_entropy(files) -> None:
    lm = CausalLMModule(str(files / "model"))
    batch = next(iter(_data(files).train_dataloader()))
    out = lm.training_step(batch, 0)
    logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = []
    for row in range(batch["input_ids"].shape[0]):
        target = batch["labels"][row, 1:]
        answer = target != -100
        assert 0 < answer.sum() < answer.numel()  # the prompt is not learned
        want.append(F.cross_entropy(logits[row, :-1][answer], target[answer]))
    torch.testing.assert_close(out["per_sample_loss"], torch.stack(want).detach())
    torch.testing.assert_close(out["loss"], torch.stack(want).mean())
    # The observers see each pair's first answer token.
    first = (batch["labels"][:, 1:] != -100).int().argmax(dim=1)
    rows = torch.arange(4)
    torch.testing.assert_close(out["target"], batch["labels"][:, 1:][rows, first])
    torch.testing.assert_close(out["logits"], logits[:, :-1][rows, first].detach())


@pytest.mark.parametrize(
    "criterion",
    [
        LabelSmoothingCrossEntropy(0.0, reduction="none"),
        LabelSmoothingCrossEntropy(0.1, reduction="none"),
        MaxSupLoss(0.1, None, reduction="none"),
    ],
    ids=["ce", "label_smoothing", "maxsup"],
)
def test_fused_head_gives_the_unfused_losses_and_gradients(files, criterion) -> None:
    plain = CausalLMModule(str(files / "model"), criterion=criterion)
    fused = CausalLMModule(str(files / "model"), criterion=criterion)
    KernelSwap(fused_head=True, impl="torch").swap(fused)
    assert fused._fusion is not None
    batch = next(iter(_data(files).train_dataloader()))
    a, b = plain.training_step(batch, 0), fused.training_step(batch, 0)
    a["loss"].backward()
    b["loss"].backward()
    torch.testing.assert_close(b["per_sample_loss"], a["per_sample_loss"])
    torch.testing.assert_close(b["logits"], a["logits"])
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_refuses_noisefit_and_an_unknown_criterion(files, tmp_path) -> None:
    class OwnTokenLoss(torch.nn.Module):
        reduction = "none"

        def forward(self, logits, target):
            return F.cross_entropy(logits, target, reduction="none")

    lm = CausalLMModule(str(files / "model"), criterion=OwnTokenLoss())
    with pytest.raises(ValueError, match="OwnTokenLoss is none of those"):
        lm.enable_fused_head("torch")
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[KernelSwap(fused_head=True), NoiseFiT(num_layers=1)],
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="NoiseFiT needs the model's logits"):
        trainer.fit(CausalLMModule(str(files / "model")), datamodule=_data(files))


def test_lora_trains_only_the_adapters_and_noisefit_finds_the_blocks(files, tmp_path) -> None:
    pytest.importorskip("peft")  # here only: importing peft takes seconds
    pl.seed_everything(0, verbose=False)
    lm = CausalLMModule(str(files / "model"), lora_r=4, lora_alpha=8)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    noisefit = NoiseFiT(num_layers=2, calibration_passes=2)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[noisefit],
        default_root_dir=tmp_path,
    )
    trainer.fit(lm, datamodule=_data(files))
    assert len(noisefit.selected) == 2
    assert all(".layers." in name for name in noisefit.selected)
    params = dict(lm.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in before.items())
    assert torch.isfinite(trainer.callback_metrics["noisefit/soft"])


def test_small_loss_selection_keeps_whole_pairs(files, tmp_path) -> None:
    selection = SmallLossSelection(forget_rate=0.5, num_gradual=1)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[selection],
        default_root_dir=tmp_path,
    )
    trainer.fit(CausalLMModule(str(files / "model")), datamodule=_data(files))
    # Second epoch: half of each batch of 4 pairs is kept.
    assert trainer.callback_metrics["train/kept_fraction"] == pytest.approx(0.5)


def test_bad_setups_fail_clearly(files, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        CausalLMModule(str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        CausalLMModule()
    with pytest.raises(ValueError, match="embedding only 64 rows"):
        CausalLMModule(str(files / "model"), num_classes=65)
    with pytest.raises(ValueError, match="reduction='none'"):
        CausalLMModule(str(files / "model"), criterion=LabelSmoothingCrossEntropy(0.1))
    with pytest.raises(ValueError, match="lora_r"):
        CausalLMModule(str(files / "model"), lora_r=0)
    with pytest.raises(ValueError, match="needs a model_type"):
        CausalLMModule(config={"vocab_size": 64})
    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    built = CausalLMModule(config={"model_type": "llama", "vocab_size": 40, **sizes})
    assert type(built.model).__name__ == "LlamaForCausalLM"
    assert built.model.config.vocab_size == 40 and built.model.training


def _fit(files, root, max_steps: int, ckpt_path=None, seed: int = 0) -> CausalLMModule:
    from lightning_noise.callbacks import ResumableCheckpoint

    pl.seed_everything(seed, verbose=False)
    lm = CausalLMModule(str(files / "model"), lora_r=None)
    checkpoint = ResumableCheckpoint(
        dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[SmallLossSelection(forget_rate=0.25, num_gradual=1), checkpoint],
        default_root_dir=root,
        deterministic=True,
    )
    trainer.fit(lm, datamodule=_data(files), ckpt_path=ckpt_path)
    return lm


def test_resume_mid_epoch_is_exact(files, tmp_path) -> None:
    """4 batches an epoch; stopped after 3 steps (mid-epoch), resumed to 6 (into epoch 2)."""
    straight = _fit(files, tmp_path / "a", max_steps=6)
    _fit(files, tmp_path / "b", max_steps=3)
    resumed = _fit(files, tmp_path / "c", 6, ckpt_path=tmp_path / "b" / "step=3.ckpt", seed=1)
    start = CausalLMModule(str(files / "model")).state_dict()
    changed = False
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        changed |= not torch.equal(a, start[name])
    assert changed


def test_sam_with_the_fused_head_and_gradient_noise_train(files, tmp_path) -> None:
    from lightning_noise.callbacks import SAM, GradientNoise

    for callbacks in ([SAM(rho=0.05), KernelSwap(fused_head=True)], [GradientNoise()]):
        lm = CausalLMModule(str(files / "model"))
        before = [p.detach().clone() for p in lm.parameters()]
        trainer = pl.Trainer(
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        )
        trainer.fit(lm, datamodule=_data(files))
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        assert any(not torch.equal(p, q) for p, q in zip(lm.parameters(), before, strict=True))


def _yes_no_pairs(path, noisy=(3, 6, 9, 12)):
    """16 questions answered "yes", except the ``noisy`` ones, answered "no" (wrong labels)."""
    import json

    numbers = ["one", "two", "three", "four"]
    with path.open("w") as f:
        for i in range(16):
            prompt = f"what is {numbers[i % 4]} plus {numbers[i // 4]}"
            f.write(json.dumps({"prompt": prompt, "response": "no" if i in noisy else "yes"}))
            f.write("\n")
    return path


@pytest.mark.slow  # about 20 epochs of the tiny model: over a minute on a loaded CPU
def test_dynamics_late_stopping_and_label_audit_work_per_pair(files, tmp_path) -> None:
    """Each prompt/response pair is one sample: Late Stopping drops the 4 pairs whose answer
    is wrong (never learned first), re-trains on the 12 others, and LabelAudit ranks those 4
    first, reporting the first answer token's ids."""
    from lightning_noise.callbacks import LabelAudit, LateStopping
    from lightning_noise.dynamics import TrainingDynamics

    noisy = [3, 6, 9, 12]
    data = PromptResponseDataModule(
        str(_yes_no_pairs(tmp_path / "yes_no.jsonl", noisy)), str(files / "model"), batch_size=4
    )
    pl.seed_everything(0, verbose=False)
    lm = CausalLMModule(str(files / "model"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    seen: list[tuple[int, list[int]]] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append((trainer.current_epoch, batch["index"].tolist()))

    dynamics = TrainingDynamics(k=1)
    late = LateStopping(
        rate=0.75, rounds_per_k=(1,), warmup_epochs=0, final_epochs=3, max_round_epochs=8
    )
    audit = LabelAudit(score="aum", output_dir=str(tmp_path / "audit"))
    trainer = pl.Trainer(
        max_epochs=-1,
        callbacks=[dynamics, late, audit, Spy()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(lm, datamodule=data)
    # Late Stopping: one round reached its 12 first-learned pairs, the wrong-answer pairs out.
    assert late.rounds[0]["reached_target"] == 1.0
    assert late.kept.tolist() == [i for i in range(16) if i not in noisy]
    final_start = int(late.rounds[0]["epochs"])
    final = [i for epoch, batch in seen if epoch >= final_start for i in batch]
    assert sorted(final) == sorted(late.kept.tolist() * 3)  # 3 final epochs, kept pairs only
    assert dynamics.store.update_count.tolist() == [
        final_start + (0 if i in noisy else 3) for i in range(16)
    ]
    # LabelAudit: the given labels are each pair's first answer token, the 4 "no"s rank first.
    tokenizer = data.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert audit.given_labels.tolist() == [no if i in noisy else yes for i in range(16)]
    assert sorted(audit.ranking[:4].tolist()) == noisy
    assert (audit.predicted_labels[late.kept] == yes).all()
    assert Path(audit.csv_path).read_text().count("\n") == 17  # header + one row per pair


def test_dict_samples_are_indexed_and_label_audit_asks_for_sample_logits() -> None:
    from lightning_noise.callbacks import LabelAudit
    from lightning_noise.dynamics.reports import is_indexed_sample
    from lightning_noise.types import DictSampleModule

    assert is_indexed_sample({"input_ids": [1, 2], "labels": [-100, 2], "index": 0})
    assert not is_indexed_sample({"input_ids": [1, 2], "labels": [-100, 2]})
    assert issubclass(CausalLMModule, DictSampleModule)
    with pytest.raises(ValueError, match=r"no `sample_logits\(batch\)"):
        LabelAudit._check_dict_samples(pl.LightningModule())
