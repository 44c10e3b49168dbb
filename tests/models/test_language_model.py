"""The generated addition task, the tiny causal LM, and NoiseFiT on it (also from the CLI)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _trainers import make_trainer

import lightning_noise.data.text as text_module
import lightning_noise.models.language_model as lm_module
from lightning_noise.callbacks import NoiseFiT
from lightning_noise.cli import build_cli
from lightning_noise.data import AdditionDataModule
from lightning_noise.data.text import EOS, decode, encode
from lightning_noise.models import TinyCausalLM

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "addition_lm_noisefit.yaml"


def test_doctests() -> None:
    for module in (text_module, lm_module):
        assert doctest.testmod(module, raise_on_error=True).failed == 0


def _lines(dataset) -> list[str]:
    inputs, labels = dataset.tensors
    return [decode(torch.cat([x[:1], y[y != -100]])) for x, y in zip(inputs, labels, strict=True)]


def test_addition_lines_are_right_disjoint_and_shifted() -> None:
    dm = AdditionDataModule(num_train=300, num_val=50, num_test=50, max_operand=30, seed=3)
    splits = [_lines(s) for s in dm._splits]
    assert [len(s) for s in splits] == [300, 50, 50]
    pairs = [{line.split("=")[0] for line in split} for split in splits]
    assert not (pairs[0] & pairs[1] or pairs[0] & pairs[2] or pairs[1] & pairs[2])
    for line in [line for split in splits for line in split]:
        left, answer = line.split("=")
        a, b = (int(v) for v in left.split("+"))
        assert 0 <= a <= 30 and 0 <= b <= 30 and int(answer) == a + b
    inputs, labels = dm._splits[0].tensors
    for x, y in zip(inputs, labels, strict=True):
        kept = y[y != -100]
        # Labels are the next tokens of the line: the inputs shifted by one, ending in <eos>.
        assert kept[-1] == EOS and torch.equal(kept[:-1], x[1 : len(kept)])
    again = AdditionDataModule(num_train=300, num_val=50, num_test=50, max_operand=30, seed=3)
    assert _lines(again._splits[0]) == splits[0]
    other = AdditionDataModule(num_train=300, num_val=50, num_test=50, max_operand=30, seed=4)
    assert _lines(other._splits[0]) != splits[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_train=0), "num_train"),
        (dict(num_test=-1), "num_test"),
        (dict(max_operand=0), "max_operand"),
        (dict(num_train=90, num_val=10, num_test=1, max_operand=9), "lower the split sizes"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_addition_bad_arguments_name_the_fix(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdditionDataModule(**kwargs)


def test_encode_rejects_unknown_characters() -> None:
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("1-2")


def test_lm_is_causal_and_its_loss_is_next_token_cross_entropy() -> None:
    torch.manual_seed(0)
    lm = TinyCausalLM(num_classes=15, d_model=32, n_layers=2, n_heads=2).eval()
    ids = torch.randint(3, 15, (2, 9))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1 - 3) % 12 + 3
    logits, logits_changed = lm(ids), lm(changed)
    # A later token never reaches an earlier position; it does reach its own.
    torch.testing.assert_close(logits[:, :6], logits_changed[:, :6])
    assert not torch.allclose(logits[:, 6:], logits_changed[:, 6:])
    labels = torch.randint(0, 15, (2, 9))
    labels[0, 5:] = -100
    want = F.cross_entropy(logits.reshape(-1, 15), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm.criterion(logits, labels), want)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_classes=1), "vocabulary size"),
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(in_chans=3), "in_chans does not apply"),
    ],
)
def test_lm_bad_arguments_name_the_fix(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TinyCausalLM(**kwargs)


def test_lm_rejects_sequences_longer_than_max_len() -> None:
    with pytest.raises(ValueError, match="max_len=8"):
        TinyCausalLM(max_len=8, d_model=16, n_layers=1, n_heads=2)(torch.zeros(1, 9).long())


def test_lm_learns_addition_tokens_with_noisefit(tmp_path) -> None:
    """NoiseFiT finds the LM's blocks in ``layers`` and training with its hybrid loss learns:
    the validation loss falls well below that of the untrained model."""
    torch.manual_seed(0)
    dm = AdditionDataModule(num_train=512, num_val=128, num_test=0, max_operand=30, batch_size=64)
    lm = TinyCausalLM(num_classes=dm.num_classes, d_model=32, n_layers=3, n_heads=2)
    noisefit = NoiseFiT(num_layers=2)
    trainer = make_trainer(tmp_path, [noisefit], max_epochs=4)
    (before,) = trainer.validate(lm, datamodule=dm, verbose=False)
    trainer.fit(lm, datamodule=dm)
    (after,) = trainer.validate(lm, datamodule=dm, verbose=False)
    assert len(noisefit.selected) == 2
    assert all(name.startswith("layers.") for name in noisefit.selected)
    assert after["val/loss"] < 0.6 * before["val/loss"]
    assert after["val/token_acc"] > before["val/token_acc"] + 0.2


def test_lm_recipe_runs_from_the_cli(tmp_path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPE),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model, TinyCausalLM)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    noisefit = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NoiseFiT))
    assert len(set(noisefit.selected)) == 3
    assert set(noisefit.snr) == {f"layers.{i}" for i in range(4)}
    assert "val/answer_acc" in cli.trainer.callback_metrics
