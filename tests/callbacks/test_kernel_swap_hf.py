"""KernelSwap on Hugging Face causal LMs and on loss functions held as attributes."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

import _hf

import lightning_noise.functional.lm_head as lm_head_module
from lightning_noise.callbacks import KernelSwap
from lightning_noise.functional.lm_head import FusedLMHead, RoutedLoss


def test_doctests() -> None:
    assert doctest.testmod(lm_head_module, raise_on_error=True).failed == 0


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


class OwnLoss(nn.Module):
    """A module that computes its loss through a loss function attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 9)
        self.loss_function = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=0.1)

    def forward(self, x, y):
        return self.loss_function(self.net(x), y)


def test_a_loss_function_attribute_is_routed_to_the_kernel_with_equal_gradients() -> None:
    torch.manual_seed(0)
    plain, swapped = OwnLoss(), OwnLoss()
    swapped.load_state_dict(plain.state_dict())
    swap = KernelSwap(impl="torch")
    assert swap.swap(swapped) == {"OwnLoss": "loss_function <lambda> -> routed"}
    x, y = torch.randn(10, 6), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, -100])
    a, b = plain(x, y), swapped(x, y)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a)
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(swapped)[name], grad)
    assert swapped.loss_function.routed == 1 and swapped.loss_function.fallbacks == 0
    # A class-weighted call is left to PyTorch, and counted.
    routed = RoutedLoss(lambda z, t: F.cross_entropy(z, t, weight=torch.ones(9)), impl="torch")
    routed(torch.randn(4, 9), torch.tensor([0, 1, 2, 3]))
    assert (routed.routed, routed.fallbacks) == (0, 1)


def test_hf_causal_lm_fused_head_gives_the_unswapped_loss_and_gradients() -> None:
    plain, swapped = _hf.llama(), _hf.llama()
    swap = KernelSwap(impl="auto", fused_head=True)
    replaced = swap.swap(swapped)
    assert replaced["LlamaForCausalLM"] == "Linear head + ForCausalLMLoss -> linear_cross_entropy"
    assert set(swap.fused) == {""}
    ids, labels = _batch()
    for model in (plain, swapped):
        model.train()
    out_plain = plain(input_ids=ids, labels=labels)
    out = swapped(input_ids=ids, labels=labels)
    assert out.logits.shape == (3, 0, 64)  # the full logits never existed
    out_plain.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_plain.loss)
    want = _grads(plain)
    got = _grads(swapped)
    assert set(got) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Gradient accumulation's num_items_in_batch: a sum divided by it, as transformers does.
    n = torch.tensor(40)
    torch.testing.assert_close(
        swapped(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
        plain(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
    )
    # Evaluation, or no labels: the model's own logits.
    swapped.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(swapped(input_ids=ids).logits, plain(input_ids=ids).logits)
        evaluated = swapped(input_ids=ids, labels=labels)
    assert evaluated.logits.shape == (3, 12, 64)
    swap.fused[""].remove()
    assert swapped.loss_function.__name__ == "ForCausalLMLoss"


def test_a_model_that_changes_its_logits_before_the_loss_is_refused_by_the_probe() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # logits = 0.5 * tanh(logits / 0.5) after the head
    )
    model = Gemma2ForCausalLM(config)
    with pytest.raises(ValueError, match="soft-capping"):
        FusedLMHead(model, impl="torch")
    swap = KernelSwap(impl="torch", fused_head=True)
    swap.swap(model)
    assert not swap.fused and "soft-capping" in swap.skipped["Gemma2ForCausalLM"]
    # The unfused loss is still routed to the fused cross-entropy.
    assert isinstance(model.loss_function, RoutedLoss)


def test_fused_head_without_a_head_to_fuse_fails_at_setup() -> None:
    with pytest.raises(ValueError, match="found no causal LM head"):
        KernelSwap(fused_head=True).setup(None, OwnLoss(), "fit")  # type: ignore[arg-type]
