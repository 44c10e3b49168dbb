"""Sharpness-aware minimization, trainer-free: SAM, ASAM and FSAM's ascent and exact restore.

SAM (Foret et al., ICLR 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") minimises the loss at the worst nearby point: with ``g = grad L(w)``,

    e = rho * g / ||g||_2,        g_SAM = grad L(w + e),

and the base optimizer steps from ``w`` with ``g_SAM``. ASAM (Kwon et al., ICML 2021) makes the
neighbourhood scale-invariant with ``T_w = |w| + eta`` on weights:
``e = rho * T_w^2 g / ||T_w g||``. FSAM (Zhong et al., Findings of EMNLP 2022) perturbs only
the parameters with the largest Fisher information ``g^2``.

The core (torch only) for any PyTorch loop; :class:`lightning_noise.callbacks.SAM` is its
Lightning adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_noise._validate import check_number

__all__ = [
    "FisherSharpnessAwareMinimization",
    "SharpnessAwareMinimization",
    "fisher_mask",
    "frozen_batchnorm_stats",
]


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
    that :meth:`restore` is exact (``w + e - e`` is not ``w`` in floating point); that copy's
    buffers are allocated at the first ascent and reused. Nothing here reads a tensor on the
    host (no synchronisation with the GPU).

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
        self.rho = check_number("rho", rho, low=0, low_open=True)
        self.eta = check_number("eta", eta, low=0)
        self.eps = check_number("eps", eps, low=0)
        self.adaptive = bool(adaptive)
        self.named_params = _named(params)
        unnamed = all(name.startswith("param_") for name, _ in self.named_params)
        #: Which parameters ASAM rescales (``"weight"`` in the name, as the official code).
        self.scale_invariant = [unnamed or "weight" in name for name, _ in self.named_params]
        #: The parameters perturbed by the last ascent, and their saved values.
        self._backup: list[nn.Parameter] = []
        self._saved: list[Tensor] = []
        self._perturbed = False

    @property
    def perturbed(self) -> bool:
        """Whether the parameters currently sit at ``w + e``."""
        return bool(self._perturbed)

    def _masks(self) -> Sequence[Tensor | None]:
        """Per-parameter 0/1 masks of the perturbation; ``None`` perturbs fully (SAM)."""
        return [None] * len(self.named_params)

    def _entries(self) -> list[tuple[nn.Parameter, Tensor | None, Tensor | None]]:
        """``(parameter, T_w or None, mask or None)`` of every parameter with a gradient."""
        entries = []
        for (_, p), scale_inv, mask in zip(
            self.named_params, self.scale_invariant, self._masks(), strict=True
        ):
            if p.grad is None:
                continue
            t = p.detach().abs().add_(self.eta) if self.adaptive and scale_inv else None
            entries.append((p, t, mask))
        return entries

    def _scale(self, entries: list[Any]) -> tuple[Tensor, Tensor]:
        """``(rho / (||T g|| + eps), ||T g||)`` as device tensors; the scale is 0 when the norm
        is not finite (decided with ``torch.where``, not on the host)."""
        device = entries[0][0].device
        scaled = [p.grad if t is None else p.grad * t for p, t, _ in entries]
        # ||T g||_2 over all parameters in one fused kernel per dtype, in float32 at least.
        norms = torch._foreach_norm(scaled, 2, dtype=torch.float32)
        grad_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        scale = torch.where(
            torch.isfinite(grad_norm), self.rho / (grad_norm + self.eps), grad_norm.new_zeros(())
        )
        return scale, grad_norm

    @staticmethod
    def _shape(entries: list[Any], e: list[Tensor], scale: Tensor) -> None:
        """Turn ``e = g`` into the perturbation in place: ``scale * T_w^2 g``, masked."""
        torch._foreach_mul_(e, scale)
        adaptive = [(x, t) for x, (_, t, _) in zip(e, entries, strict=True) if t is not None]
        if adaptive:
            # ASAM: T_w^2 g (one T from the norm's dual, one from T itself).
            ts = [t for _, t in adaptive]
            torch._foreach_mul_(ts, ts)
            torch._foreach_mul_([x for x, _ in adaptive], ts)
        masked = [(x, m) for x, (_, _, m) in zip(e, entries, strict=True) if m is not None]
        if masked:
            torch._foreach_mul_([x for x, _ in masked], [m for _, m in masked])

    @torch.no_grad()
    def perturbation(self) -> tuple[list[tuple[nn.Parameter, Tensor]], Tensor]:
        """The perturbation ``e`` of every parameter with a gradient, and ``||T g||``.

        Computed without a host synchronisation: when the gradient norm is not finite (a step
        the grad scaler will skip, or a diverged run) the scale is 0, so ``e`` is 0 where the
        gradient is finite and NaN where it is not.
        """
        entries = self._entries()
        if not entries:
            return [], torch.zeros(())
        scale, grad_norm = self._scale(entries)
        e = [p.grad.to(p.dtype, copy=True) for p, _, _ in entries]
        self._shape(entries, e, scale)
        return [(p, x) for (p, _, _), x in zip(entries, e, strict=True)], grad_norm

    def _saved_buffers(self, params: list[nn.Parameter]) -> list[Tensor]:
        """Persistent copies of ``params`` (allocated once, refilled each step)."""
        saved = self._saved
        if len(saved) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
            for b, p in zip(saved, params, strict=True)
        ):
            saved = self._saved = [
                torch.empty_like(p, memory_format=torch.preserve_format) for p in params
            ]
        return saved

    @torch.no_grad()
    def ascent(self, *, zero_grad: bool = True) -> Tensor:
        """Move to ``w + e`` and (by default) clear the gradients for the second pass.

        No host synchronisation: the weights are saved into buffers kept from step to step
        (one copy, no allocation), then perturbed with fused ``torch._foreach_*`` ops. With
        ``zero_grad`` the gradient itself is turned into ``e`` in place (no extra buffer) and
        then multiplied by 0.

        A non-finite gradient norm cannot skip anything without reading it on the host, so:
        the scale is 0, the weights move only where the gradient is not finite (to NaN; the
        exact restore undoes it), and "clearing" by multiplying by 0 leaves those NaNs in the
        gradient, so the step's final gradient stays non-finite, for the grad scaler or
        :class:`~lightning_noise.callbacks.NonFiniteGuard` to skip. (A norm that overflows
        float32 with finite entries perturbs nothing and clears the gradient as usual.)

        Returns:
            The norm ``||T g||`` used for ``e`` (``||g||`` for SAM), a device tensor.
        """
        if self.perturbed:
            raise RuntimeError("ascent() called twice without restore()")
        entries = self._entries()
        if not entries:
            return torch.zeros(())
        scale, grad_norm = self._scale(entries)
        params = [p for p, _, _ in entries]
        self._backup = params
        torch._foreach_copy_(self._saved_buffers(params), params)
        grads = [p.grad for p in params]
        in_place = zero_grad and all(g.dtype == p.dtype for g, p in zip(grads, params, strict=True))
        e = (
            grads
            if in_place
            else [g.to(p.dtype, copy=True) for g, p in zip(grads, params, strict=True)]
        )
        self._shape(entries, e, scale)
        torch._foreach_add_(params, e)
        self._perturbed = True
        if zero_grad:
            others = [p.grad for _, p in self.named_params if p.grad is not None]
            # x * 0 is 0 for finite x and NaN for inf/NaN: a non-finite gradient stays so.
            torch._foreach_mul_(others, 0.0)
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Put the parameters back to ``w`` exactly; the gradients are left untouched."""
        if self._perturbed:
            torch._foreach_copy_(self._backup, self._saved[: len(self._backup)])
        self._backup = []
        self._perturbed = False

    def step(self, closure: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Tensor:
        """One full SAM step in a plain loop: ``closure`` must zero nothing and call backward.

        The optimizer's gradients are cleared first; the loss at ``w`` is returned.
        """
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.ascent()
        if self.perturbed:  # False only when no parameter has a gradient
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
    check_number("keep_ratio", keep_ratio, low=0, high=1, low_open=True)
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
        self.keep_ratio = check_number("keep_ratio", keep_ratio, low=0, high=1, low_open=True)
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


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
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
