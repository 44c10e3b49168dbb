"""Gradient noise, trainer-free: the annealed schedule, the per-step seed and the draw.

Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks",
arXiv:1511.06807: at optimizer step ``t`` each gradient element gets i.i.d. noise
``N(0, sigma_t^2)`` with ``sigma_t^2 = eta / (1 + t)^gamma``.
:class:`~lightning_noise.callbacks.GradientNoise` is the Lightning adapter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_noise._validate import check_int, check_number

__all__ = ["add_gradient_noise", "check_schedule", "gradient_noise_std", "noise_seed"]

_SEED_MASK = (1 << 63) - 1


def check_schedule(eta: Any, gamma: Any) -> tuple[float, float]:
    """``(eta, gamma)`` as floats: eta > 0, gamma >= 0, both finite; else a ``ValueError``."""
    return (
        check_number("eta", eta, low=0, low_open=True, hint="(the paper uses 0.01-1)"),
        check_number("gamma", gamma, low=0, hint="(the paper uses 0.55)"),
    )


def gradient_noise_std(step: int, *, eta: float, gamma: float) -> float:
    """Standard deviation of the gradient noise at optimizer step ``step`` (Neelakantan et al.).

    The paper's schedule ``eta / (1 + t)^gamma`` is the noise **variance**, so the standard
    deviation is its square root.

    Args:
        step: The optimizer-step counter ``t`` (0 for the first step), >= 0.
        eta: Initial variance, > 0; the paper chooses from {0.01, 0.3, 1.0}.
        gamma: Decay exponent of the variance, >= 0; the paper uses 0.55.

    Returns:
        ``sqrt(eta / (1 + step) ** gamma)``.

    Example:
        >>> round(gradient_noise_std(0, eta=0.3, gamma=0.55) ** 2, 6)
        0.3
        >>> round(gradient_noise_std(99, eta=1.0, gamma=0.55), 4)  # 100^-0.275
        0.2818
    """
    check_schedule(eta, gamma)
    check_int("step", step, minimum=0)
    # A common bug (e.g. a widely copied Lightning example and several ports) uses
    # eta / (1 + t)^gamma itself as the std: that squares the variance, giving 0.09 instead of
    # 0.3 at t=0 for eta=0.3, and makes the variance decay as (1 + t)^(-2 gamma).
    return math.sqrt(eta / (1 + step) ** gamma)


def noise_seed(seed: int, step: int) -> int:
    """Seed of the noise generator at one step: a 63-bit hash of ``(seed, step)``.

    The noise is a function of ``(seed, step)`` only, so it is identical on every DDP rank and
    continues unchanged after a resume. The pair is hashed (BLAKE2b, stable across processes
    and platforms, unlike Python's salted ``hash``) rather than added, because ``seed + step``
    would make the runs with seeds 0 and 1 share one noise sequence shifted by a step. The
    result is masked to 63 bits so that it is a valid non-negative ``manual_seed`` everywhere.

    Args:
        seed: The user's seed, >= 0.
        step: The optimizer step, >= 0.

    Returns:
        An integer in ``[0, 2**63)``.

    Example:
        >>> noise_seed(0, 5) == noise_seed(0, 5) != noise_seed(0, 6)
        True
    """
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


@torch.no_grad()
def add_gradient_noise(parameters: Iterable[Tensor], std: float, *, generator_seed: int) -> None:
    """Add i.i.d. ``N(0, std^2)`` noise in place to the ``.grad`` of every parameter.

    Parameters whose ``.grad`` is ``None`` are skipped. The noise is drawn from a
    ``torch.Generator`` on each gradient's device seeded with ``generator_seed`` (one
    generator per device, parameters in the given order), never from the global RNG, so the
    same parameters in the same order with the same seed always get the same noise.

    Args:
        parameters: Tensors whose ``.grad`` receive the noise (e.g. ``model.parameters()``).
        std: Standard deviation of the noise, finite and >= 0.
        generator_seed: Seed of the generator, e.g. ``noise_seed(seed, step)``.

    Raises:
        ValueError: for a negative or non-finite ``std``, or a sparse gradient.

    Example:
        >>> w = torch.zeros(3, requires_grad=True)
        >>> w.grad = torch.zeros(3)
        >>> add_gradient_noise([w], 0.5, generator_seed=noise_seed(0, 0))
        >>> bool(w.grad.ne(0).all())
        True
    """
    check_number("std", std, low=0)
    generators: dict[torch.device, torch.Generator] = {}
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            # Dense noise would densify the gradient behind a sparse optimizer's back.
            raise ValueError(
                "add_gradient_noise does not support sparse gradients (e.g. "
                "nn.Embedding(sparse=True)); use dense gradients"
            )
        generator = generators.get(grad.device)
        if generator is None:
            generator = torch.Generator(device=grad.device).manual_seed(generator_seed)
            generators[grad.device] = generator
        noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
        grad.add_(noise, alpha=std)
