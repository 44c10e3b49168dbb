"""NoiseFiT's tensor parts: adaptive noise, layer signal-to-noise ratios and the hybrid loss.

Khadangi et al. 2025, "NoiseFiT: Noise-Augmented Fine-Tuning" (arXiv:2504.03302; official
code ``akhadangi/NoiseFiT``, ``NoiseFiT_v1_manual_snr.py`` for the paper's v1). PyTorch only;
:class:`~lightning_noise.callbacks.NoiseFiT` wires them into a Trainer.

* :func:`adaptive_noise`: Gaussian noise on hidden states ``h`` (``[..., D]``, one token per
  row), scaled per token by robust statistics over the hidden dimension: the median absolute
  deviation ``MAD`` (at least 1e-6 of the token's norm), a weight
  ``exp(-beta * |h - median| / (MAD + 1e-6))`` that gives outlier coordinates less noise, and
  ``noise_factor = min(exp(var_token / mean(var)), 5)``:
  ``h + randn * base_std * MAD * weight * noise_factor``.
* :func:`layer_snr`: per layer, ``mean|h| / (mean|noisy(h) - h| + 1e-6)`` over
  ``passes`` draws of :func:`adaptive_noise` with ``base_std = noise_std * std(h)``.
* :func:`hybrid_loss`: ``alpha * CE + (1 - alpha) * soft + lam * consistency`` with
  ``soft = (KL(softmax(z / T) || softmax(z1)) + KL(softmax(z / T) || softmax(z2))) / 2`` between
  the clean logits ``z`` and two noisy passes, and ``consistency = KL(softmax(z2) ||
  softmax(z1))``, both averaged over the positions of ``mask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adaptive_noise", "hybrid_loss", "layer_snr"]

_EPS = 1e-6


def adaptive_noise(
    hidden: Tensor,
    base_std: float | Tensor,
    *,
    beta: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``hidden`` plus NoiseFiT's adaptive Gaussian noise (per token over the last dim).

    Example:
        >>> h = torch.randn(2, 5, 16)
        >>> g = torch.Generator().manual_seed(0)
        >>> noisy = adaptive_noise(h, 0.1, generator=g)
        >>> noisy.shape == h.shape and not torch.equal(noisy, h)
        True
    """
    var = hidden.var(dim=-1, keepdim=True)
    noise_factor = torch.exp(var / (var.mean() + _EPS)).clamp(max=5.0)
    median = hidden.median(dim=-1, keepdim=True).values
    deviation = (hidden - median).abs()
    mad = deviation.median(dim=-1, keepdim=True).values
    mad = torch.maximum(mad, _EPS * hidden.norm(dim=-1, keepdim=True))
    weight = torch.exp(-beta * deviation / (mad + _EPS))
    noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
    return hidden + noise * (base_std * mad * weight * noise_factor)


@torch.no_grad()
def layer_snr(
    hidden_states: Sequence[Tensor],
    *,
    noise_std: float = 0.1,
    passes: int = 10,
    beta: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``[L]`` signal-to-noise ratio of each layer's output (the official ``select_layers``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> snr = layer_snr([torch.randn(2, 4, 8), 3 * torch.randn(2, 4, 8)], generator=g)
        >>> snr.shape
        torch.Size([2])
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    snr = []
    for h in hidden_states:
        h = h.detach().float()
        signal = h.abs().mean()
        base_std = noise_std * h.std()
        diffs = [
            (adaptive_noise(h, base_std, beta=beta, generator=generator) - h).abs().mean()
            for _ in range(passes)
        ]
        snr.append(signal / (torch.stack(diffs).mean() + _EPS))
    return torch.stack(snr) if snr else torch.zeros(0)


def _kl_rows(target_logits: Tensor, input_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``[...]`` ``KL(softmax(target / T) || softmax(input))`` summed over the last dim."""
    target = F.softmax(target_logits / temperature, dim=-1)
    return F.kl_div(F.log_softmax(input_logits, dim=-1), target, reduction="none").sum(dim=-1)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def hybrid_loss(
    ce: Tensor,
    clean_logits: Tensor,
    noisy_logits1: Tensor,
    noisy_logits2: Tensor,
    *,
    mask: Tensor | None = None,
    alpha: float = 0.5,
    lam: float = 0.1,
    temperature: float = 1.0,
    detach_clean: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """NoiseFiT's loss and its parts ``{"ce", "soft", "consistency"}``.

    Args:
        ce: The (reduced) cross-entropy of the clean pass.
        clean_logits, noisy_logits1, noisy_logits2: ``[..., C]`` logits of the three passes.
        mask: ``[...]`` positions that count (e.g. ``labels != -100``); ``None``: all.
        alpha: Weight of CE against the soft term (official: 0.5).
        lam: Weight of the consistency term (official v1: 0.1).
        temperature: Of the clean soft targets (official: 1).
        detach_clean: Stop the gradient through the clean soft targets (the official v2
            does; v1, the paper's, does not).
    """
    target = clean_logits.detach() if detach_clean else clean_logits
    soft = 0.5 * (
        _kl_rows(target, noisy_logits1, temperature) + _kl_rows(target, noisy_logits2, temperature)
    )
    soft = _masked_mean(soft, mask)
    consistency = _masked_mean(_kl_rows(noisy_logits2, noisy_logits1), mask)
    total = alpha * ce + (1 - alpha) * soft + lam * consistency
    return total, {"ce": ce.detach(), "soft": soft.detach(), "consistency": consistency.detach()}


def choose_layers(snr: Tensor, num_layers: int, *, largest: bool = True) -> list[int]:
    """Positions of the ``num_layers`` layers with the largest (or lowest) SNR, best first
    (the official ``--snr_format``: Largest or Lowest).

    Example:
        >>> choose_layers(torch.tensor([0.5, 2.0, 1.0]), 2)
        [1, 2]
    """
    if not 1 <= num_layers <= snr.numel():
        raise ValueError(f"num_layers must be in [1, {snr.numel()}], got {num_layers!r}")
    return torch.topk(snr, num_layers, largest=largest).indices.tolist()
