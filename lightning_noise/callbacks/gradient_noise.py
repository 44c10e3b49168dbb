"""Gradient noise (Neelakantan et al., 2015): annealed Gaussian noise added to every gradient.

"Adding Gradient Noise Improves Learning for Very Deep Networks", arXiv:1511.06807. At every
optimizer step ``t`` each gradient element gets i.i.d. noise ``N(0, sigma_t^2)`` with the
annealed variance ``sigma_t^2 = eta / (1 + t)^gamma``.

The trainer-free core is :mod:`lightning_noise.functional.gradient_noise`
(``gradient_noise_std``, the schedule; ``noise_seed``, the per-step seed;
``add_gradient_noise``, the draw); :class:`GradientNoise` is the thin Lightning adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_noise._compat import optimizer_unscales_itself
from lightning_noise._validate import check_choice, check_int
from lightning_noise.callbacks.composition import check_gradient_strategy
from lightning_noise.functional.gradient_noise import (
    DRAWS,
    add_gradient_noise,
    check_schedule,
    gradient_noise_std,
    noise_seed,
)

__all__ = ["GradientNoise", "add_gradient_noise", "gradient_noise_std", "noise_seed"]


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

    Determinism: each parameter's noise is a pure function of ``noise_seed(seed, t)`` and the
    parameter's position in the optimizer, never of the global RNG (see
    :func:`add_gradient_noise`). It is therefore identical on every DDP rank (replicas stay
    in sync), and a run resumed from a checkpoint continues the same noise. ``draw="auto"``
    (default) uses ``torch.randn`` from a seeded generator for ordinary gradients (one pass,
    the fastest) and, under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), a
    counter-based draw in which each rank computes the noise of its own gradient shard only,
    element for element the same whatever the number of ranks. A sharded and an unsharded
    run therefore draw different noise (same distribution) unless both use
    ``draw="counter"``, which makes every run, sharded or not, draw the same noise at about
    10 times the generator's cost on the CPU.

    Args:
        eta: Initial noise variance, > 0. The paper chooses from {0.01, 0.3, 1.0}.
        gamma: Decay exponent of the variance, >= 0. The paper uses 0.55.
        seed: Seed of the noise sequence, an integer >= 0; independent of the global seed.
        draw: ``"auto"``, ``"generator"`` or ``"counter"`` (see above).

    Raises:
        ValueError: for bad hyperparameters (in ``__init__``).
        RuntimeError: at ``setup`` under DeepSpeed or FSDP1 (``FSDPStrategy``), whose
            gradients are not the parameters' ``.grad`` (use DDP or FSDP2), or tensor
            parallelism (untested); at ``on_fit_start`` under
            ``16-mixed`` with an optimizer that unscales its own gradients (``fused=True``),
            where the noise would be shrunk by the loss scale.

    Example:
        >>> noise = GradientNoise(eta=0.3, gamma=0.55, seed=0)
        >>> trainer = pl.Trainer(callbacks=[noise], logger=False, enable_progress_bar=False)
        >>> round(noise.std(trainer.global_step) ** 2, 6)
        0.3
    """

    def __init__(
        self, eta: float = 0.3, gamma: float = 0.55, *, seed: int = 0, draw: str = "auto"
    ) -> None:
        self.eta, self.gamma = check_schedule(eta, gamma)
        self.seed = check_int("seed", seed, minimum=0)
        self.draw = check_choice("draw", draw, DRAWS)
        #: Global step at which noise was last added; -1 before the first step.
        self.last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(eta=self.eta, gamma=self.gamma, seed=self.seed)

    def std(self, step: int) -> float:
        """Noise standard deviation at optimizer step ``step``."""
        return gradient_noise_std(step, eta=self.eta, gamma=self.gamma)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_gradient_strategy("GradientNoise", "GradientNoise", trainer.strategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Such optimizers are not unscaled before on_before_optimizer_step (Lightning's
        # MixedPrecision plugin); noise added to scaled gradients would be divided by the scale.
        fused = [type(opt).__name__ for opt in trainer.optimizers if optimizer_unscales_itself(opt)]
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
        add_gradient_noise(params, std, generator_seed=noise_seed(self.seed, step), draw=self.draw)
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
