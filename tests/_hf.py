"""A tiny random Llama-style model, its tokenizer and prompt/response pairs, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "what is two plus three four one five six seven the cat sat on a mat yes no".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (``tokenizers`` trained on a few strings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(WORDS)] * 2, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def llama_config(vocab_size: int = 64, layers: int = 4, **overrides):
    from transformers import LlamaConfig

    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return LlamaConfig(**{**sizes, **overrides})


def llama(seed: int = 0, **config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**config))


def write_model(folder: Path, layers: int = 4) -> Path:
    """Save a random tiny Llama and the tokenizer into ``folder`` (``save_pretrained``)."""
    llama(layers=layers).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int = 16) -> Path:
    """``n`` prompt/response lines: a question and its word answer, or a short phrase."""
    numbers = ["one", "two", "three", "four", "five", "six", "seven"]
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 3, (i // 3) % 3
            prompt = f"what is {numbers[a]} plus {numbers[b]}"
            f.write(json.dumps({"prompt": prompt, "response": numbers[a + b + 1]}) + "\n")
    return path
