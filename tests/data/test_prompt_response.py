"""PromptResponseDataModule: answer-only labels from a local JSONL and a local tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import _hf

from lightning_noise.data import PromptResponseDataModule


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    _hf.tokenizer().save_pretrained(folder)
    return folder


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_labels_mask_the_prompt_and_the_padding(tmp_path, tokenizer_dir) -> None:
    rows = [
        {"q": "what is one plus one", "a": "two"},
        {"q": "the cat", "a": "sat on a mat"},
    ]
    train = _write(tmp_path / "t.jsonl", [*rows, ""])  # a blank line is skipped
    dm = PromptResponseDataModule(
        train, str(tokenizer_dir), prompt_field="q", response_field="a", batch_size=2
    )
    tok = _hf.tokenizer()
    assert dm.num_classes == len(tok)
    batch = next(iter(dm._loader("train", shuffle=False)))
    eos = tok.eos_token_id
    for row, pair in enumerate(rows):
        p = tok(pair["q"])["input_ids"]
        r = [*tok(pair["a"], add_special_tokens=False)["input_ids"], eos]
        n = len(p) + len(r)
        assert batch["input_ids"][row, :n].tolist() == p + r
        assert batch["labels"][row, :n].tolist() == [-100] * len(p) + r
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["labels"].shape[1] - n
        )
        assert (batch["labels"][row, n:] == -100).all()
    assert batch["index"].tolist() == [0, 1]
    assert dm.val_dataloader() == []


def test_max_length_cuts_and_a_pair_without_answer_tokens_is_refused(
    tmp_path, tokenizer_dir
) -> None:
    train = _write(tmp_path / "t.jsonl", [{"prompt": "what is one", "response": "two three four"}])
    dm = PromptResponseDataModule(train, str(tokenizer_dir), max_length=5)
    item = dm._splits["train"][0]
    assert len(item["input_ids"]) == 5 and item["labels"][:3] == [-100] * 3
    with pytest.raises(ValueError, match=r"lines \[1\].*max_length=3"):
        PromptResponseDataModule(train, str(tokenizer_dir), max_length=3)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (['{"prompt": "a"', ""], r"t.jsonl:1 is not valid JSON"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], r"t.jsonl:2 has no field 'response'"),
        ([{"prompt": "a", "response": 3}], "must be text"),
        ([""], "holds no pairs"),
    ],
)
def test_bad_lines_are_named(tmp_path, tokenizer_dir, rows, match) -> None:
    with pytest.raises(ValueError, match=match):
        PromptResponseDataModule(_write(tmp_path / "t.jsonl", rows), str(tokenizer_dir))


def test_missing_files_fail_clearly(tmp_path, tokenizer_dir) -> None:
    train = _write(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptResponseDataModule(str(tmp_path / "none.jsonl"), str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        PromptResponseDataModule(train, str(tmp_path / "no_tokenizer"))
    with pytest.raises(FileNotFoundError, match="holds no saved tokenizer"):
        PromptResponseDataModule(train, str(tmp_path))
    with pytest.raises(ValueError, match=r"--data\.init_args\.train_file"):
        PromptResponseDataModule(None, str(tokenizer_dir))
    assert torch.is_tensor(
        next(iter(PromptResponseDataModule(train, str(tokenizer_dir)).train_dataloader()))["index"]
    )
