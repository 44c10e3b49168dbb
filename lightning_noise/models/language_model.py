"""``TinyCausalLM``: a small decoder-only transformer language model, for the LM recipes.

Pre-norm blocks (LayerNorm, causal multi-head self-attention through PyTorch's
``scaled_dot_product_attention``, LayerNorm, GELU MLP) in ``self.layers``, learned position
embeddings and a linear head. The loss is next-token cross-entropy over the positions whose
label is not -100; with a :class:`~lightning_noise.callbacks.NoiseFiT` callback it becomes
NoiseFiT's hybrid loss (the blocks are found in ``layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noise.losses import LabelSmoothingCrossEntropy
from lightning_noise.mixins.noisefit import NoiseFiTMixin

__all__ = ["TinyCausalLM", "answer_accuracy"]

OptimizerCallable = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def answer_accuracy(logits: Tensor, input_ids: Tensor, labels: Tensor, equals_token: int) -> Tensor:
    """Fraction of lines whose answer is predicted entirely right with teacher forcing.

    The answer is every predicted position from the ``equals_token`` on (its digits and the
    end token); lines without ``equals_token`` or without any label count as wrong.

    Example:
        >>> ids = torch.tensor([[1, 4, 14, 5]])  # "<bos>1=2"; labels: next tokens
        >>> labels = torch.tensor([[4, 14, 5, 2]])
        >>> logits = torch.nn.functional.one_hot(labels, 15).float()
        >>> answer_accuracy(logits, ids, labels, equals_token=14).item()
        1.0
        >>> logits[0, 3] = logits[0, 3].roll(1)  # the end token after the answer is wrong
        >>> answer_accuracy(logits, ids, labels, equals_token=14).item()
        0.0
    """
    valid = labels != -100
    right = (logits.argmax(-1) == labels) & valid
    answer = ((input_ids == equals_token).cumsum(dim=1) > 0) & valid
    return ((right | ~answer).all(dim=1) & answer.any(dim=1)).float().mean()


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyCausalLM(NoiseFiTMixin, pl.LightningModule):
    """A small causal transformer LM trained with next-token cross-entropy.

    Batches are ``(input_ids, labels)`` of shape ``[B, T]``, ``labels`` already shifted (the
    next token of each position) with -100 where nothing is predicted (see
    :class:`~lightning_noise.data.AdditionDataModule`). Logged: ``train/loss``,
    ``val/loss``, ``val/token_acc`` and, when the data module has an ``equals_token``,
    ``val/answer_acc`` (the fraction of lines whose answer, after ``=``, is predicted
    entirely right with teacher forcing); likewise for ``test/``.

    Args:
        num_classes: Vocabulary size (LightningCLI links it from the DataModule).
        max_len: Longest sequence (position embeddings).
        d_model, n_layers, n_heads: Width, depth and heads of the transformer.
        dropout: Attention dropout.
        criterion: A loss on ``[B, T, V]`` logits with classes last and -100 ignored; default
            :class:`~lightning_noise.losses.LabelSmoothingCrossEntropy` with smoothing 0
            (plain cross-entropy). Any loss of :mod:`lightning_noise.losses` fits.
        optimizer: A callable from parameters to an optimizer; default AdamW(lr=3e-3).
        equals_token: Token after which the answer starts, for ``answer_acc`` (None: off).
        in_chans: Must stay ``None``: token models have no input channels (the CLI links
            image DataModules' ``in_chans``; a text DataModule has none).

    Example:
        >>> lm = TinyCausalLM(num_classes=15, d_model=32, n_layers=2, n_heads=2)
        >>> lm(torch.zeros(2, 10, dtype=torch.long)).shape
        torch.Size([2, 10, 15])
    """

    def __init__(
        self,
        num_classes: int = 15,
        max_len: int = 64,
        d_model: int = 64,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        equals_token: int | None = 14,
        in_chans: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes (the vocabulary size) must be >= 2, got {num_classes}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if in_chans is not None:
            raise ValueError("TinyCausalLM reads token ids: in_chans does not apply")
        self.save_hyperparameters(ignore=["criterion", "optimizer"])
        self.embed = nn.Embedding(num_classes, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.criterion = criterion if criterion is not None else LabelSmoothingCrossEntropy(0.0)
        self.optimizer_factory = optimizer
        self.equals_token = equals_token

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(
                f"sequence of {t} tokens exceeds max_len={self.position.num_embeddings}"
            )
        x = self.embed(input_ids) + self.position(torch.arange(t, device=input_ids.device))
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))

    def noisefit_inputs(self, batch: Any) -> Tensor:
        return batch[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, labels = batch[0], batch[1]
        logits = self(input_ids)
        loss = self.criterion(logits, labels)
        loss = self.noisefit_loss(loss, logits, lambda: self(input_ids), mask=labels != -100)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        input_ids, labels = batch[0], batch[1]
        logits = self(input_ids)
        valid = labels != -100
        right = (logits.argmax(-1) == labels) & valid
        n = input_ids.shape[0]
        self.log(f"{stage}/loss", self.criterion(logits, labels), batch_size=n)
        token_acc = right.sum() / valid.sum().clamp_min(1)
        self.log(f"{stage}/token_acc", token_acc, batch_size=n)
        if self.equals_token is not None:
            whole = answer_accuracy(logits, input_ids, labels, self.equals_token)
            self.log(f"{stage}/answer_acc", whole, batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)
        return self.optimizer_factory(self.parameters())
