"""Sharpness-Aware Minimization as a Lightning callback: SAM, ASAM and FSAM.

The algorithms (Foret et al. 2021; Kwon et al. 2021; Zhong et al. 2022) live in the
trainer-free core :mod:`lightning_noise.functional.sam`. These callbacks run SAM's second
forward/backward pass inside ``on_before_optimizer_step`` so that SAM composes with everything
else Lightning does (any optimizer and LR scheduler, fp32, bf16-mixed and 16-mixed, gradient
clipping, DDP, BatchNorm) and with every other method of the library: the second pass runs
with every :class:`~lightning_noise.types.Pausable` module and callback paused, so per-step
state moves once per optimizer step (see ``docs/architecture.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_noise._compat import (
    metrics_restored,
    optimizer_unscales_itself,
    unscale_grads_marking_non_finite,
)
from lightning_noise._validate import check_choice, check_int, check_number
from lightning_noise.callbacks.composition import check_gradient_strategy
from lightning_noise.functional.sam import (
    FisherSharpnessAwareMinimization,
    SharpnessAwareMinimization,
    fisher_mask,
    frozen_batchnorm_stats,
)
from lightning_noise.types import Pausable

__all__ = [
    "ASAM",
    "FSAM",
    "SAM",
    "FisherSharpnessAwareMinimization",
    "SharpnessAwareMinimization",
    "fisher_mask",
]

Perturbation = Literal["global", "local"]
SecondPassRNG = Literal["same", "fresh"]


@contextlib.contextmanager
def second_pass(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Run ``training_step`` again without moving any per-step state.

    ``self.log`` calls are dropped; every torchmetrics ``Metric`` of the module is put back to
    its state before the pass (epoch-level metrics count each sample once); and every module
    (the LightningModule included) and every callback that is
    :class:`~lightning_noise.types.Pausable` runs the pass inside its ``paused_updates()``:
    ELR's targets, the sample weights of :class:`~lightning_noise.mixins.PerSampleLossMixin`
    (reused from the first pass, not recomputed at the perturbed weights), Co-teaching's
    selection and a user's own state move once per step.
    """
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with metrics_restored(pl_module), contextlib.ExitStack() as paused:
            for owner in [*pl_module.modules(), *trainer.callbacks]:
                if isinstance(owner, Pausable):
                    paused.enter_context(owner.paused_updates())
            yield
    finally:
        del pl_module.log, pl_module.log_dict  # back to the class methods


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    return None


class SAM(Callback):
    """Sharpness-Aware Minimization (Foret et al. 2021) for any LightningModule.

    At ``on_before_optimizer_step`` the gradient ``g`` of the batch is ready (unscaled under
    16-mixed, all-reduced under DDP). The callback moves the weights to ``w + e`` with
    ``e = rho * g / ||g||`` (ASAM: ``rho * T_w^2 g / ||T_w g||``), runs ``training_step`` on the
    same batch again and back-propagates, puts the weights back, and lets Lightning clip the
    new gradient and step the optimizer. So any optimizer and LR scheduler, weight decay and
    learning rate behave exactly as without SAM; gradient clipping applies to the final (SAM)
    gradient.

    Settings it handles:
        * precision: 32, bf16-mixed, 16-mixed. Under 16-mixed the second loss is scaled with
          the grad scaler and its gradient unscaled by the callback (the scaler allows one
          ``unscale_`` per step); a step whose SAM gradient is not finite is skipped and the
          scale lowered, as the scaler would. A non-finite first gradient leaves the SAM
          gradient non-finite (so the scaler, or ``NonFiniteGuard`` in fp32, skips the step)
          and is counted in :attr:`skipped_steps`; the second pass still runs then, since
          deciding to skip it would mean reading the gradient norm on the host every step.
        * No host synchronisation per step: the ascent, restore and unscale run as fused
          device ops (``torch._foreach_*``) and nothing is read back to the CPU.
        * DDP: ``perturbation="global"`` (default) computes ``e`` from the all-reduced
          gradient, so every replica perturbs alike. ``"local"`` computes it from each
          replica's own gradient (the paper's m-sharpness with m the per-device batch, and the
          official JAX default); the SAM gradients are averaged either way.
        * FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``,
          ``tensor_parallel_size=1``): parameters and gradients are sharded ``DTensor``s. The
          norm ``||g||`` is global (the shards' squared norms all-reduced, one collective a
          step), ``e``, the ascent and the exact restore act on each rank's local shard (the
          saved copy is one copy of the local shard), and FSAM's top-k is global (see
          :func:`fisher_mask`); the second forward all-gathers ``w + e``. The result equals
          the DDP run's within float tolerance. ``perturbation="local"`` is refused there.
          DeepSpeed and FSDP1 (``FSDPStrategy``) are refused at setup.
        * BatchNorm: running statistics are updated by the first pass only.
        * Dropout and other randomness: with ``second_pass_rng="same"`` (default) the second
          pass replays the random state of the first, so it sees the same dropout masks and
          ``e`` is the only difference between the passes (as the official JAX code, which
          passes the same PRNG key to both). ``"fresh"`` draws new randomness.
        * Logging and torchmetrics: the second pass logs nothing and leaves metrics as they
          were; ``on_train_batch_end`` sees the outputs of the first pass.

    Not supported, with an error at ``fit`` start: manual optimization (use
    :class:`SharpnessAwareMinimization` in your ``training_step``), ``accumulate_grad_batches
    > 1`` (the second pass would only see the last micro-batch), strategies other than
    single-device, DDP and FSDP2 (``ModelParallelStrategy``). Put SAM before other callbacks
    that change gradients in ``on_before_optimizer_step`` (e.g. GradientNoise), since SAM
    replaces the gradient.

    Args:
        rho: neighbourhood radius, > 0 (paper default 0.05; 0.1 for its label-noise results).
        adaptive: ASAM's scale-invariant neighbourhood (use ~10x larger rho).
        eta: ASAM's ``T_w = |w| + eta`` offset.
        perturbation: ``"global"`` or ``"local"`` (m-sharpness under DDP), see above.
        second_pass_rng: ``"same"`` or ``"fresh"``, see above.

    Example:
        >>> trainer = pl.Trainer(callbacks=[SAM(rho=0.05)], max_epochs=1)  # doctest: +SKIP
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.01,
        perturbation: Perturbation = "global",
        second_pass_rng: SecondPassRNG = "same",
    ) -> None:
        self.rho = check_number("rho", rho, low=0, low_open=True, hint="(the paper uses 0.05)")
        self.adaptive = bool(adaptive)
        self.eta = check_number("eta", eta, low=0)
        self.perturbation = check_choice("perturbation", perturbation, ("global", "local"))
        self.second_pass_rng = check_choice("second_pass_rng", second_pass_rng, ("same", "fresh"))
        self._core: SharpnessAwareMinimization | None = None
        self._batch: Any = None
        self._batch_idx = 0
        self._rng_state: tuple[Tensor, Tensor | None] | None = None
        # Steps whose first gradient was not finite, counted on the device (no host sync).
        self._skipped = torch.zeros((), dtype=torch.int64)

    @property
    def skipped_steps(self) -> int:
        """Steps whose first gradient was not finite (their SAM gradient is left non-finite,
        so the grad scaler or ``NonFiniteGuard`` skips them). Reading it synchronises with
        the device: do it at logging intervals or after training, not every step."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = torch.tensor(int(value), dtype=torch.int64, device=self._skipped.device)

    # ------------------------------------------------------------------ configuration
    @property
    def state_key(self) -> str:
        return self._generate_state_key(rho=self.rho, adaptive=self.adaptive)

    def _make_core(self, pl_module: pl.LightningModule) -> SharpnessAwareMinimization:
        return SharpnessAwareMinimization(
            pl_module.named_parameters(), rho=self.rho, adaptive=self.adaptive, eta=self.eta
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{name} runs inside Lightning's automatic optimization; with "
                "automatic_optimization=False use the trainer-free core instead: "
                "lightning_noise.callbacks.sam.SharpnessAwareMinimization (ascent(), second "
                "manual_backward, restore(), then optimizer.step())"
            )
        if trainer.accumulate_grad_batches > 1:
            raise RuntimeError(
                f"{name} does not support accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}: its second pass would see only the last "
                "micro-batch; use a larger batch_size instead (or accumulate_grad_batches=1)"
            )
        check_gradient_strategy(name, "SAM", trainer.strategy)
        supported = SingleDeviceStrategy | DDPStrategy | ModelParallelStrategy
        if not isinstance(trainer.strategy, supported):
            raise RuntimeError(
                f"{name} supports single-device, DDP and FSDP2 (ModelParallelStrategy with "
                f"fully_shard) strategies, got {type(trainer.strategy).__name__}"
            )
        if isinstance(trainer.strategy, ModelParallelStrategy) and self.perturbation == "local":
            raise RuntimeError(
                f"{name}(perturbation='local') needs each replica's own full gradient, which "
                "FSDP2 never holds (it reduce-scatters in the backward pass); use "
                "perturbation='global' under ModelParallelStrategy, or strategy='ddp' for "
                "m-sharpness"
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, SAM) and cb is not self]
        if others:
            raise RuntimeError(
                f"{name} and {type(others[0]).__name__}: use one sharpness-aware callback; "
                "each would run its own second pass and replace the gradient, so keep one of "
                "SAM, ASAM, FSAM"
            )
        mine = trainer.callbacks.index(self) if self in trainer.callbacks else -1
        for cb in trainer.callbacks[: max(mine, 0)]:
            if type(cb).on_before_optimizer_step is not Callback.on_before_optimizer_step:
                raise RuntimeError(
                    f"{type(cb).__name__} changes gradients in on_before_optimizer_step before "
                    f"{name} replaces them with the SAM gradient; list {name} before "
                    f"{type(cb).__name__} in the callbacks"
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core = self._make_core(pl_module)

    # ---------------------------------------------------------------------- the step
    def _ddp_module(self, trainer: pl.Trainer) -> Any:
        model = trainer.strategy.model
        return model if hasattr(model, "require_backward_grad_sync") else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        if self.second_pass_rng == "same":
            device = pl_module.device
            cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            self._rng_state = (torch.get_rng_state(), cuda)
        ddp = self._ddp_module(trainer)
        if ddp is not None and self.perturbation == "local":
            # m-sharpness: the first backward keeps each replica's own gradient (what
            # DDP.no_sync does), the second one is all-reduced as usual.
            ddp.require_backward_grad_sync = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batch = None
        self._rng_state = None
        ddp = self._ddp_module(trainer)
        if ddp is not None:
            ddp.require_backward_grad_sync = True

    def _before_ascent(self, trainer: pl.Trainer, core: SharpnessAwareMinimization) -> None:
        """Hook for subclasses (FSAM updates its mask here, from the first gradient)."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        core = self._core
        if core is None or self._batch is None:
            return
        ddp = self._ddp_module(trainer)
        if ddp is not None and not ddp.require_backward_grad_sync:
            ddp.require_backward_grad_sync = True
            # After a no-sync forward DDP also skips its next buffer broadcast; ask for it, so
            # the second forward hands rank 0's BatchNorm statistics to every replica.
            ddp.require_forward_param_sync = True
        self._before_ascent(trainer, core)
        grad_norm = core.ascent(zero_grad=True)
        if not core.perturbed:
            return  # no parameter has a gradient
        # Not read on the host: a non-finite first gradient still runs the second pass (at
        # most one forward and backward wasted on such a rare step) and stays non-finite.
        self._skipped = self._skipped.to(grad_norm.device) + (~torch.isfinite(grad_norm)).long()
        try:
            self._second_pass(trainer, pl_module, optimizer)
        finally:
            core.restore()
        pl_module.log(f"{type(self).__name__.lower()}/grad_norm", grad_norm, on_step=True)

    def _second_pass(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        rng = contextlib.nullcontext()
        if self._rng_state is not None:
            cpu, cuda = self._rng_state
            devices = [pl_module.device] if cuda is not None else []
            rng = torch.random.fork_rng(devices=devices)
        with (
            rng,
            frozen_batchnorm_stats(pl_module),
            second_pass(trainer, pl_module),
            torch.enable_grad(),
        ):
            if self._rng_state is not None:
                cpu, cuda = self._rng_state
                torch.set_rng_state(cpu)
                if cuda is not None:
                    torch.cuda.set_rng_state(cuda, pl_module.device)
            # Through the strategy: the precision plugin's autocast and, under DDP, the
            # wrapper's forward, so that the second backward is all-reduced like the first.
            output = trainer.strategy.training_step(self._batch, self._batch_idx)
            loss = _loss_of(output)
            if loss is None:
                raise RuntimeError(
                    f"{type(self).__name__}: training_step returned {type(output).__name__} on "
                    "the second pass; it must return the loss (a tensor or a dict with 'loss')"
                )
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None and not optimizer_unscales_itself(optimizer):
            self._unscale(scaler, optimizer)

    @staticmethod
    @torch.no_grad()
    def _unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the SAM gradient; if it is not finite make the scaler skip this step.

        ``GradScaler.unscale_`` already ran on this step (Lightning calls it before
        ``on_before_optimizer_step``) and may run only once, so we divide by the scale
        ourselves and, on inf/NaN, mark the scaler's record of this step as non-finite:
        ``scaler.step`` then skips the optimizer and ``scaler.update`` lowers the scale. Both
        with the scaler's own fused device op: no per-parameter check read on the host.
        """
        unscale_grads_marking_non_finite(scaler, optimizer)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "adaptive": self.adaptive,
            "eta": self.eta,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


class ASAM(SAM):
    """Adaptive SAM (Kwon et al. 2021): :class:`SAM` with ``adaptive=True``, rho 0.5, eta 0.01.

    The official ASAM code uses rho 0.5 on CIFAR-10 and 1.0 on CIFAR-100 (SAM: 0.05/0.1).
    """

    def __init__(
        self,
        rho: float = 0.5,
        *,
        eta: float = 0.01,
        perturbation: Perturbation = "global",
        second_pass_rng: SecondPassRNG = "same",
    ) -> None:
        super().__init__(
            rho,
            adaptive=True,
            eta=eta,
            perturbation=perturbation,
            second_pass_rng=second_pass_rng,
        )


class FSAM(SAM):
    """Fisher-mask SAM (Zhong et al. 2022): perturb only the parameters with high Fisher info.

    Every ``mask_interval`` optimizer steps (from step 0) the mask is recomputed from the
    squared gradient of the current batch (the official code's Fisher estimate): the global top
    ``keep_ratio`` of the weights are perturbed; biases, embeddings and BatchNorm parameters
    are always perturbed in full; the scale ``rho / ||g||`` uses the whole gradient (see
    :class:`FisherSharpnessAwareMinimization`). The mask is a ``bool`` per parameter (one byte,
    not a float copy) and is saved in checkpoints, so a resumed run perturbs exactly the same
    parameters.

    Deviation from the official code: its mask update clears the gradients before the ascent
    on the steps where it runs (``model.zero_grad()`` in ``set_fisher_mask``); we keep them, so
    every step is a SAM step.

    Args:
        rho: neighbourhood radius, > 0 (official default 0.05).
        keep_ratio: fraction of the masked parameters perturbed, in (0, 1] (default 0.1).
        mask_interval: optimizer steps between mask updates, >= 1 (official scripts: 100).
        perturbation: as :class:`SAM`.
        second_pass_rng: as :class:`SAM`.
    """

    def __init__(
        self,
        rho: float = 0.05,
        keep_ratio: float = 0.1,
        mask_interval: int = 100,
        *,
        perturbation: Perturbation = "global",
        second_pass_rng: SecondPassRNG = "same",
    ) -> None:
        super().__init__(rho, perturbation=perturbation, second_pass_rng=second_pass_rng)
        self.keep_ratio = check_number("keep_ratio", keep_ratio, low=0, high=1, low_open=True)
        self.mask_interval = check_int("mask_interval", mask_interval, minimum=1)
        self._pending_masks: list[Tensor | None] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rho=self.rho, keep_ratio=self.keep_ratio)

    def _make_core(self, pl_module: pl.LightningModule) -> FisherSharpnessAwareMinimization:
        bn_params = {
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in pl_module.named_modules()
            if isinstance(module, _BatchNorm)
            for param_name, _ in module.named_parameters(recurse=False)
        }
        core = FisherSharpnessAwareMinimization(
            pl_module.named_parameters(),
            rho=self.rho,
            keep_ratio=self.keep_ratio,
            always_perturbed=bn_params,
        )
        if self._pending_masks is not None:
            core.load_mask_state(self._pending_masks)
            self._pending_masks = None
        return core

    def _before_ascent(self, trainer: pl.Trainer, core: SharpnessAwareMinimization) -> None:
        assert isinstance(core, FisherSharpnessAwareMinimization)
        if trainer.global_step % self.mask_interval == 0 or not core.has_mask:
            core.update_mask()

    @property
    def masks(self) -> list[Tensor | None]:
        """The current masks (``None`` for parameters that are always perturbed)."""
        core = self._core
        if core is None:
            return [] if self._pending_masks is None else list(self._pending_masks)
        assert isinstance(core, FisherSharpnessAwareMinimization)
        return core.masks

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(keep_ratio=self.keep_ratio, mask_interval=self.mask_interval)
        core = self._core
        if isinstance(core, FisherSharpnessAwareMinimization) and core.has_mask:
            state["masks"] = core.mask_state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        masks = state_dict.get("masks")
        if masks is None:
            return
        # Lightning restores callback state before on_fit_start builds the core: keep the
        # masks until then (and load them now too when a core already exists).
        self._pending_masks = list(masks)
        if isinstance(self._core, FisherSharpnessAwareMinimization):
            self._core.load_mask_state(masks)
