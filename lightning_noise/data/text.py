"""A generated text task for language-model recipes: two-digit addition, character level.

Each example is one line ``<bos>a+b=c<eos>`` with ``0 <= a, b <= max_operand``; the model
reads the line and predicts every next character. The operand pairs are drawn without
repetition from a seed, so the train, validation and test splits are disjoint. Nothing is
downloaded; the corpus is generated in ``__init__`` (a few milliseconds).

Batches are ``(input_ids, labels)``: ``input_ids`` ``[B, T]`` are the line's tokens but the
last, ``labels`` ``[B, T]`` the tokens shifted by one (next-token targets) with -100 on the
padding, which losses ignore.
"""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_noise._validate import check_int

__all__ = ["VOCAB", "AdditionDataModule", "decode", "encode"]

#: Token ids: 0 padding, 1 begin, 2 end, then the characters.
SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB = (*SPECIALS, *"0123456789+=")
PAD, BOS, EOS = 0, 1, 2
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    """``<bos>`` + the characters of ``text`` + ``<eos>`` as token ids.

    Example:
        >>> encode("1+2=3")
        [1, 4, 13, 5, 14, 6, 2]
    """
    unknown = sorted(set(text) - set(_INDEX))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the vocabulary {VOCAB[3:]}")
    return [BOS, *(_INDEX[ch] for ch in text), EOS]


def decode(ids: list[int] | Tensor) -> str:
    """The characters of ``ids``, without the special tokens.

    Example:
        >>> decode(encode("12+30=42"))
        '12+30=42'
    """
    ids = ids.tolist() if isinstance(ids, Tensor) else ids
    return "".join(VOCAB[i] for i in ids if i >= len(SPECIALS))


class AdditionDataModule(pl.LightningDataModule):
    """Two-digit addition lines for next-token prediction (see the module docstring).

    Args:
        num_train, num_val, num_test: Lines per split (disjoint operand pairs).
        max_operand: Largest operand; ``(max_operand + 1) ** 2`` pairs exist.
        batch_size: Lines per batch.
        num_workers: DataLoader workers.
        seed: Seed of the pairs and their split.

    Example:
        >>> dm = AdditionDataModule(num_train=8, num_val=2, num_test=2, max_operand=9)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape  # 8 lines of at most "<bos>9+9=18" (inputs drop the last token)
        (torch.Size([8, 7]), torch.Size([8, 7]))
        >>> bool((y[:, :-1] == x[:, 1:]).logical_or(y[:, :-1] == -100).all())  # shifted by one
        True
    """

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        max_operand: int = 99,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        num_train = check_int("num_train", num_train, minimum=1)
        num_val = check_int("num_val", num_val, minimum=1)
        num_test = check_int("num_test", num_test, minimum=0)
        max_operand = check_int("max_operand", max_operand, minimum=1)
        pairs = (max_operand + 1) ** 2
        if num_train + num_val + num_test > pairs:
            raise ValueError(
                f"{num_train + num_val + num_test} lines requested but only {pairs} distinct "
                f"operand pairs exist with max_operand={max_operand}; lower the split sizes"
            )
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(pairs, generator=gen)
        a, b = order // (max_operand + 1), order % (max_operand + 1)
        lines = [encode(f"{x}+{y}={x + y}") for x, y in zip(a.tolist(), b.tolist(), strict=True)]
        width = len(encode(f"{max_operand}+{max_operand}={2 * max_operand}"))
        tokens = torch.full((pairs, width), PAD, dtype=torch.long)
        for i, line in enumerate(lines):
            tokens[i, : len(line)] = torch.tensor(line)
        inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
        labels[labels == PAD] = -100
        bounds = [0, num_train, num_train + num_val, num_train + num_val + num_test]
        self._splits = [
            TensorDataset(inputs[lo:hi], labels[lo:hi]) for lo, hi in itertools.pairwise(bounds)
        ]

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(VOCAB)

    @property
    def num_classes(self) -> int:
        """Classes of next-token prediction: the vocabulary (linked to a model's output size)."""
        return len(VOCAB)

    @property
    def equals_token(self) -> int:
        """Token id of ``=``, after which the answer starts."""
        return _INDEX["="]

    def _loader(self, split: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        # The shuffled training loader is stateful (torchdata): a checkpoint holds its
        # position and the generator's state, so a mid-epoch resume continues exactly.
        loader_class = StatefulDataLoader if shuffle else DataLoader
        return loader_class(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2, shuffle=False)
