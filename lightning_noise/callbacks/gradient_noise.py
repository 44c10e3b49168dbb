"""Gradient noise (Neelakantan et al., 2015): annealed Gaussian noise added to every gradient.

"Adding Gradient Noise Improves Learning for Very Deep Networks", arXiv:1511.06807. At every
optimizer step ``t`` each gradient element gets i.i.d. noise ``N(0, sigma_t^2)`` with the
annealed variance ``sigma_t^2 = eta / (1 + t)^gamma``.

The trainer-free core is :func:`gradient_noise_std` (the schedule), :func:`noise_seed` (the
per-step seed) and :func:`add_gradient_noise` (the draw); :class:`GradientNoise` is the thin
Lightning adapter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor

__all__ = ["GradientNoise", "add_gradient_noise", "gradient_noise_std", "noise_seed"]

_SEED_MASK = (1 << 63) - 1


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_schedule(eta: Any, gamma: Any) -> None:
    if not _is_real(eta) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta must be a finite number > 0 (the paper uses 0.01-1), got {eta!r}")
    if not _is_real(gamma) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0 (the paper uses 0.55), got {gamma!r}")


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
    _check_schedule(eta, gamma)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
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
    if not _is_real(std) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
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


class GradientNoise(Callback):
    """Add annealed Gaussian noise to the gradients (Neelakantan et al., 2015, arXiv:1511.06807).

    At each optimizer step ``t = trainer.global_step`` every gradient element of the
    optimizer's parameters gets i.i.d. noise ``N(0, eta / (1 + t)^gamma)`` (that expression is
    the variance; see :func:`gradient_noise_std`). The current std is logged as
    ``gradient_noise/std``.

    When it acts: in ``on_before_optimizer_step``, i.e. after the backward pass (under DDP after
    the gradient all-reduce) and once per optimizer step, so with ``accumulate_grad_batches=k``
    the noise is added once to the accumulated gradient, not k times. Under AMP ``16-mixed``
    Lightning has already unscaled the gradients at this hook, so the noise has the stated
    scale. Manual optimization works the same way: Lightning calls the hook inside every
    ``optimizer.step()`` of a ``LightningOptimizer``.

    Order with clipping: Lightning clips gradients (``gradient_clip_val``) right *after* this
    hook, so the noise is added first and the clipped noisy gradient reaches the optimizer. A
    clip bound therefore still bounds every update, and early large noise (``eta=1``) cannot
    blow up a step. (Under manual optimization you call ``clip_gradients`` yourself, usually
    before ``optimizer.step()``, so there the noise comes after your clipping.)

    Determinism: the noise is drawn from a generator seeded with ``noise_seed(seed, t)``, never
    from the global RNG. It is therefore identical on every DDP rank (replicas stay in sync)
    and a run resumed from a checkpoint continues the same noise sequence.

    Args:
        eta: Initial noise variance, > 0. The paper chooses from {0.01, 0.3, 1.0}.
        gamma: Decay exponent of the variance, >= 0. The paper uses 0.55.
        seed: Seed of the noise sequence, an integer >= 0; independent of the global seed.

    Raises:
        ValueError: for bad hyperparameters (in ``__init__``).
        RuntimeError: at ``setup`` under a sharded strategy (FSDP, DeepSpeed, ModelParallel),
            where the same noise would repeat on every rank's shard; at ``on_fit_start`` under
            ``16-mixed`` with an optimizer that unscales its own gradients (``fused=True``),
            where the noise would be shrunk by the loss scale.

    Example:
        >>> noise = GradientNoise(eta=0.3, gamma=0.55, seed=0)
        >>> trainer = pl.Trainer(callbacks=[noise], logger=False, enable_progress_bar=False)
        >>> round(noise.std(trainer.global_step) ** 2, 6)
        0.3
    """

    def __init__(self, eta: float = 0.3, gamma: float = 0.55, *, seed: int = 0) -> None:
        _check_schedule(eta, gamma)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.eta = float(eta)
        self.gamma = float(gamma)
        self.seed = seed
        #: Global step at which noise was last added; -1 before the first step.
        self.last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(eta=self.eta, gamma=self.gamma, seed=self.seed)

    def std(self, step: int) -> float:
        """Noise standard deviation at optimizer step ``step``."""
        return gradient_noise_std(step, eta=self.eta, gamma=self.gamma)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        sharded = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
        if stage == "fit" and isinstance(trainer.strategy, sharded):
            raise RuntimeError(
                f"GradientNoise does not support {type(trainer.strategy).__name__}: each rank "
                "holds a shard of the gradients and the rank-independent noise would repeat on "
                "every shard. Use a single device or strategy='ddp'."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Such optimizers are not unscaled before on_before_optimizer_step (Lightning's
        # MixedPrecision plugin); noise added to scaled gradients would be divided by the scale.
        fused = [
            type(opt).__name__
            for opt in trainer.optimizers
            if getattr(opt, "_step_supports_amp_scaling", False)
        ]
        if scaler is not None and fused:
            raise RuntimeError(
                f"GradientNoise under precision='16-mixed' needs gradients unscaled before the "
                f"optimizer step, but {fused} unscale inside step() (fused=True?). Use a "
                "non-fused optimizer or precision='bf16-mixed'."
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # global_step counts completed optimizer steps, so it is t for the step about to run,
        # under automatic and manual optimization alike.
        step = trainer.global_step
        std = self.std(step)
        params = (p for group in optimizer.param_groups for p in group["params"])
        add_gradient_noise(params, std, generator_seed=noise_seed(self.seed, step))
        self.last_step = step
        pl_module.log("gradient_noise/std", std, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "eta": self.eta,
            "gamma": self.gamma,
            "seed": self.seed,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # The hyperparameters are part of state_key, so a loaded state always matches them;
        # the noise itself is a function of (seed, global_step) and needs nothing restored.
        self.last_step = int(state_dict.get("last_step", -1))
