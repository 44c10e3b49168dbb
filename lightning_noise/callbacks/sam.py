"""Sharpness-Aware Minimization as a Lightning callback: SAM, ASAM and FSAM.

SAM (Foret et al., ICLR 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") minimises the loss at the worst nearby point: with ``g = grad L(w)``,

    e = rho * g / ||g||_2,        g_SAM = grad L(w + e),

and the base optimizer steps from ``w`` with ``g_SAM``. ASAM (Kwon et al., ICML 2021,
"ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
Networks") makes the neighbourhood scale-invariant with ``T_w = |w| + eta`` on weights:
``e = rho * T_w^2 g / ||T_w g||``. FSAM (Zhong et al., Findings of EMNLP 2022, "Improving
Sharpness-Aware Minimization with Fisher Mask for Better Generalization on Language Models")
perturbs only the parameters with the largest Fisher information ``g^2``.

The trainer-free core, :class:`SharpnessAwareMinimization`, works in any PyTorch loop. The
callbacks run the second forward/backward pass inside ``on_before_optimizer_step`` so that
SAM composes with everything else Lightning does: any optimizer and LR scheduler, fp32,
bf16-mixed and 16-mixed (grad scaler), gradient clipping, DDP and BatchNorm.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

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


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _named(params: Iterable[Any]) -> list[tuple[str, nn.Parameter]]:
    """Accept parameters or (name, parameter) pairs; unnamed ones get their position."""
    named: list[tuple[str, nn.Parameter]] = []
    for i, item in enumerate(params):
        if isinstance(item, tuple):
            named.append((str(item[0]), item[1]))
        else:
            named.append((f"param_{i}", item))
    if not named:
        raise ValueError("SharpnessAwareMinimization needs at least one parameter")
    return named


class SharpnessAwareMinimization:
    """Trainer-free SAM/ASAM core: the ascent step and its exact undo.

    Use it in a plain PyTorch loop (or under Lightning manual optimization)::

        sam = SharpnessAwareMinimization(model.named_parameters(), rho=0.05)
        loss_fn(model(x), y).backward()       # g at w
        sam.ascent()                          # w <- w + e, gradients cleared
        loss_fn(model(x), y).backward()       # g_SAM at w + e
        sam.restore()                         # w back, bit for bit
        optimizer.step(); optimizer.zero_grad()

    or in one call: ``sam.step(closure, optimizer)``. The perturbation is computed from the
    parameters' ``.grad`` as they are at :meth:`ascent` (under DDP: already all-reduced, or
    each replica's own for m-sharpness). The parameters before the ascent are kept in a copy so
    that :meth:`restore` is exact (``w + e - e`` is not ``w`` in floating point).

    Args:
        params: parameters or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        rho: radius of the neighbourhood, > 0 (SAM paper: 0.05; ASAM: 0.5 to 2.0).
        adaptive: ASAM (Kwon et al. 2021): scale by ``T_w = |w| + eta`` the parameters whose
            name contains ``"weight"`` (all of them when unnamed), as the official ASAM code.
        eta: ASAM's offset in ``T_w``; ignored without ``adaptive``.
        eps: added to the gradient norm (the JAX reference has none; 1e-12 keeps a zero
            gradient from dividing by zero).

    Example:
        >>> model = nn.Linear(3, 1)
        >>> sam = SharpnessAwareMinimization(model.named_parameters(), rho=0.05)
        >>> model(torch.ones(2, 3)).pow(2).mean().backward()
        >>> w = model.weight.detach().clone()
        >>> norm = sam.ascent()
        >>> bool((model.weight != w).any())
        True
        >>> sam.restore()
        >>> torch.equal(model.weight.detach(), w)
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
    ) -> None:
        self.rho = _check_positive("rho", rho)
        self.eta = _check_positive("eta", eta, allow_zero=True)
        self.eps = _check_positive("eps", eps, allow_zero=True)
        self.adaptive = bool(adaptive)
        self.named_params = _named(params)
        unnamed = all(name.startswith("param_") for name, _ in self.named_params)
        #: Which parameters ASAM rescales (``"weight"`` in the name, as the official code).
        self.scale_invariant = [unnamed or "weight" in name for name, _ in self.named_params]
        self._backup: list[tuple[nn.Parameter, Tensor]] = []

    @property
    def perturbed(self) -> bool:
        """Whether the parameters currently sit at ``w + e``."""
        return bool(self._backup)

    def _masks(self) -> Sequence[Tensor | None]:
        """Per-parameter 0/1 masks of the perturbation; ``None`` perturbs fully (SAM)."""
        return [None] * len(self.named_params)

    @torch.no_grad()
    def perturbation(self) -> tuple[list[tuple[nn.Parameter, Tensor]], Tensor]:
        """The perturbation ``e`` of every parameter with a gradient, and ``||T g||``.

        Returns an empty list when the gradient norm is not finite (a step the grad scaler
        will skip, or a diverged run): nothing is perturbed then.
        """
        entries = []
        for (_, p), scale_inv, mask in zip(
            self.named_params, self.scale_invariant, self._masks(), strict=True
        ):
            if p.grad is None:
                continue
            t = p.detach().abs().add_(self.eta) if self.adaptive and scale_inv else None
            entries.append((p, t, mask))
        if not entries:
            return [], torch.zeros(())
        # ||T g||_2 over all parameters, accumulated in float32 at least.
        norms = [
            (p.grad if t is None else p.grad * t)
            .norm(2, dtype=torch.float32)
            .to(entries[0][0].device)
            for p, t, _ in entries
        ]
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        if not torch.isfinite(grad_norm):
            return [], grad_norm
        scale = self.rho / (grad_norm + self.eps)
        out = []
        for p, t, mask in entries:
            e = p.grad.to(p.dtype) * scale.to(p.dtype)
            if t is not None:
                e.mul_(t.pow(2))  # ASAM: T_w^2 g (one T from the norm's dual, one from T itself)
            if mask is not None:
                e.mul_(mask)
            out.append((p, e))
        return out, grad_norm

    @torch.no_grad()
    def ascent(self, *, zero_grad: bool = True) -> Tensor:
        """Move to ``w + e`` and (by default) clear the gradients for the second pass.

        Returns:
            The norm ``||T g||`` used for ``e`` (``||g||`` for SAM). When it is not finite
            nothing is perturbed and the gradients are left as they are.
        """
        if self.perturbed:
            raise RuntimeError("ascent() called twice without restore()")
        perturbations, grad_norm = self.perturbation()
        for p, e in perturbations:
            self._backup.append((p, p.detach().clone()))
            p.add_(e)
        if perturbations and zero_grad:
            for _, p in self.named_params:
                if p.grad is not None:
                    p.grad.zero_()
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Put the parameters back to ``w`` exactly; the gradients are left untouched."""
        for p, w in self._backup:
            p.copy_(w)
        self._backup.clear()

    def step(self, closure: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Tensor:
        """One full SAM step in a plain loop: ``closure`` must zero nothing and call backward.

        The optimizer's gradients are cleared first; the loss at ``w`` is returned.
        """
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.ascent()
        if self.perturbed:
            try:
                with torch.enable_grad():
                    closure()
            finally:
                self.restore()
        optimizer.step()
        return loss


@torch.no_grad()
def fisher_mask(grads: Sequence[Tensor], keep_ratio: float) -> list[Tensor]:
    """Global top-``keep_ratio`` mask of the empirical Fisher ``g^2`` (FSAM, Zhong et al. 2022).

    Returns one ``bool`` tensor per gradient (1 byte per parameter). Ties at the threshold are
    broken by ``torch.topk`` so exactly ``int(N * keep_ratio)`` entries are kept (at least one).
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    sizes = [g.numel() for g in grads]
    total = sum(sizes)
    if total == 0:
        return [torch.zeros_like(g, dtype=torch.bool) for g in grads]
    keep = max(1, int(total * keep_ratio))
    # A transient float copy of the squared gradients: the mask itself is one byte a parameter.
    fisher = torch.cat([g.detach().reshape(-1).float().pow(2) for g in grads])
    flat = torch.zeros(total, dtype=torch.bool, device=fisher.device)
    flat[torch.topk(fisher, keep, sorted=False).indices] = True
    return [m.view_as(g) for m, g in zip(flat.split(sizes), grads, strict=True)]


class FisherSharpnessAwareMinimization(SharpnessAwareMinimization):
    """Trainer-free FSAM core: SAM whose perturbation is masked by the Fisher information.

    Following the official FSAM code (``WHU-ZQH/FSAM4PLM``, ``SAM_Mask``): the Fisher
    information is the squared gradient of the current mini-batch; parameters whose name
    contains ``"bias"`` or ``"embed"`` and BatchNorm parameters are always perturbed; the
    others are perturbed only where their Fisher value is in the global top ``keep_ratio``;
    the scale ``rho / ||g||`` uses the norm of the whole, unmasked gradient. Call
    :meth:`update_mask` (every ``mask_interval`` steps) before :meth:`ascent`.

    Args:
        params: ``(name, parameter)`` pairs; names decide which parameters are masked.
        rho: radius, > 0.
        keep_ratio: fraction of the masked parameters that are perturbed, in (0, 1].
        always_perturbed: names of parameters never masked (default: by the rule above;
            the callback adds the BatchNorm parameters it finds in the module).
        eps: added to the gradient norm (the official code uses 1e-7; we use 1e-12 as SAM).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        rho: float = 0.05,
        keep_ratio: float = 0.1,
        always_perturbed: Iterable[str] = (),
        eps: float = 1e-12,
    ) -> None:
        super().__init__(params, rho=rho, adaptive=False, eps=eps)
        if isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        self.keep_ratio = float(keep_ratio)
        always = set(always_perturbed)
        self.masked = [
            not ("bias" in name or "embed" in name or name in always)
            for name, _ in self.named_params
        ]
        self.masks: list[Tensor | None] = [None] * len(self.named_params)
        self.has_mask = False

    def _masks(self) -> Sequence[Tensor | None]:
        return self.masks

    @torch.no_grad()
    def update_mask(self) -> None:
        """Recompute the mask from the current gradients (parameters without one: fully masked)."""
        targets = [
            (i, p)
            for i, ((_, p), masked) in enumerate(zip(self.named_params, self.masked, strict=True))
            if masked
        ]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in targets]
        for (i, _), m in zip(targets, fisher_mask(grads, self.keep_ratio), strict=True):
            self.masks[i] = m
        self.has_mask = True

    def mask_state(self) -> list[Tensor | None]:
        """The masks as stored (``bool``, one byte a parameter), for checkpoints."""
        return [None if m is None else m.detach().cpu() for m in self.masks]

    def load_mask_state(self, masks: Sequence[Tensor | None]) -> None:
        if len(masks) != len(self.masks):
            raise ValueError(
                f"FSAM mask state holds {len(masks)} parameters but the model has "
                f"{len(self.masks)}; the checkpoint belongs to another model"
            )
        for i, ((_, p), m) in enumerate(zip(self.named_params, masks, strict=True)):
            self.masks[i] = None if m is None else m.to(device=p.device, dtype=torch.bool)
        self.has_mask = any(m is not None for m in self.masks)


# --------------------------------------------------------------------------------- callback
@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm keeps the running statistics of the first pass only (as the official code).

    With ``track_running_stats=False`` a BatchNorm layer in training mode normalises with the
    batch statistics as usual but neither updates its running buffers nor its batch counter.
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextlib.contextmanager
def _quiet(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run ``training_step`` a second time without logging or metric updates.

    ``self.log`` calls are dropped, and every torchmetrics ``Metric`` of the module is put
    back to its state before the pass, so epoch-level training metrics count each sample once.
    Submodules with a ``paused_updates()`` context (e.g. ``ELRLoss``, whose per-sample targets
    move at every training forward) run inside it, so their state moves once per step.
    """
    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = []
    for m in metrics:
        state = {
            k: (v.clone() if isinstance(v, Tensor) else list(v)) for k, v in m.metric_state.items()
        }
        saved.append((m, state, m._update_count, m._computed))
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with contextlib.ExitStack() as paused:
            for module in pl_module.modules():
                pause = getattr(module, "paused_updates", None)
                if callable(pause):
                    paused.enter_context(pause())
            yield
    finally:
        del pl_module.log, pl_module.log_dict  # back to the class methods
        for m, state, count, computed in saved:
            for k, v in state.items():
                setattr(m, k, v)
            m._update_count = count
            m._computed = computed


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
          scale lowered, as the scaler would. A non-finite first gradient skips the ascent.
        * DDP: ``perturbation="global"`` (default) computes ``e`` from the all-reduced
          gradient, so every replica perturbs alike. ``"local"`` computes it from each
          replica's own gradient (the paper's m-sharpness with m the per-device batch, and the
          official JAX default); the SAM gradients are averaged either way.
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
    single-device and DDP. Put SAM before other callbacks that change gradients in
    ``on_before_optimizer_step`` (e.g. GradientNoise), since SAM replaces the gradient.

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
        self.rho = _check_positive("rho", rho)
        self.adaptive = bool(adaptive)
        self.eta = _check_positive("eta", eta, allow_zero=True)
        if perturbation not in ("global", "local"):
            raise ValueError(f"perturbation must be 'global' or 'local', got {perturbation!r}")
        if second_pass_rng not in ("same", "fresh"):
            raise ValueError(f"second_pass_rng must be 'same' or 'fresh', got {second_pass_rng!r}")
        self.perturbation = perturbation
        self.second_pass_rng = second_pass_rng
        self._core: SharpnessAwareMinimization | None = None
        self._batch: Any = None
        self._batch_idx = 0
        self._rng_state: tuple[Tensor, Tensor | None] | None = None
        #: Steps on which no second pass ran (non-finite first gradient), for inspection.
        self.skipped_steps = 0

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
        if not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            raise RuntimeError(
                f"{name} supports single-device and DDP strategies, got "
                f"{type(trainer.strategy).__name__}"
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
            self.skipped_steps += 1  # non-finite gradient: leave it to the scaler/optimizer
            return
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
        with rng, _frozen_batchnorm_stats(pl_module), _quiet(pl_module), torch.enable_grad():
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
        if scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
            self._unscale(scaler, optimizer)

    @staticmethod
    @torch.no_grad()
    def _unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the SAM gradient; if it is not finite make the scaler skip this step.

        ``GradScaler.unscale_`` already ran on this step (Lightning calls it before
        ``on_before_optimizer_step``) and may run only once, so we divide by the scale
        ourselves and, on inf/NaN, mark the scaler's record of this step as non-finite:
        ``scaler.step`` then skips the optimizer and ``scaler.update`` lowers the scale.
        """
        inv_scale = 1.0 / scaler.get_scale()
        found = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv_scale)
                    found = found or not bool(torch.isfinite(p.grad).all())
        if found:
            # The scaler keeps no public setter for this record (torch.amp.grad_scaler).
            for found_inf in scaler._found_inf_per_device(optimizer).values():
                found_inf.fill_(1.0)

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
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float):
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        if (
            isinstance(mask_interval, bool)
            or not isinstance(mask_interval, int)
            or mask_interval < 1
        ):
            raise ValueError(f"mask_interval must be an integer >= 1, got {mask_interval!r}")
        self.keep_ratio = float(keep_ratio)
        self.mask_interval = mask_interval
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
