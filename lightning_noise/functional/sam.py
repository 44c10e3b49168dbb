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
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_noise._validate import check_number
from lightning_noise.functional._sharding import (
    DTensor,
    Shard,
    block_offsets,
    dist,
    is_sharded,
    local,
    reduce_groups,
    sum_over_shards,
)

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
        self._backup: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._perturbed = False

    @property
    def perturbed(self) -> bool:
        """Whether the parameters currently sit at ``w + e``."""
        return bool(self._perturbed)

    def _masks(self) -> Sequence[Tensor | None]:
        """Per-parameter 0/1 masks of the perturbation; ``None`` perturbs fully (SAM)."""
        return [None] * len(self.named_params)

    def _entries(self) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """``(parameter block, T_w or None, mask or None)`` of every parameter with a gradient.

        A block is the part of the parameter this process holds: the whole tensor on one
        device or under DDP, the local shard of a ``DTensor`` under FSDP2 (call under
        ``torch.no_grad()``, so that it shares storage with the parameter).
        """
        entries = []
        for (_, p), scale_inv, mask in zip(
            self.named_params, self.scale_invariant, self._masks(), strict=True
        ):
            if p.grad is None:
                continue
            w = local(p.detach())
            t = w.abs().add_(self.eta) if self.adaptive and scale_inv else None
            entries.append((w, t, mask))
        return entries

    def _grads(self) -> list[Tensor]:
        """The gradient blocks of the parameters with a gradient, in :meth:`_entries` order."""
        return [local(p.grad) for _, p in self.named_params if p.grad is not None]

    def _groups(self) -> list[tuple[object, ...]]:
        """Per parameter with a gradient: the process groups its gradient is sharded over."""
        return [reduce_groups(p.grad) for _, p in self.named_params if p.grad is not None]

    def _scale(self, entries: list[Any], grads: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(rho / (||T g|| + eps), ||T g||)`` as device tensors; the scale is 0 when the norm
        is not finite (decided with ``torch.where``, not on the host).

        Under FSDP2 each process holds a shard of every gradient: the norm is the global one,
        the square root of the all-reduced sum of the shards' squared norms (one all-reduce
        per device mesh), so every rank computes the same scale.
        """
        device = grads[0].device
        scaled = [g if t is None else g * t for g, (_, t, _) in zip(grads, entries, strict=True)]
        # ||T g||_2 over all parameters in one fused kernel per dtype, in float32 at least
        # (float64 when a gradient is float64: precision="64-true" keeps its precision).
        acc = functools.reduce(torch.promote_types, (g.dtype for g in scaled), torch.float32)
        norms = [n.to(device) for n in torch._foreach_norm(scaled, 2, dtype=acc)]
        groups = self._groups()
        if not any(groups):
            grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        else:
            squares = [n.square() for n in norms]
            grad_norm = sum_over_shards(squares, groups).sqrt()
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
    def perturbation(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """The perturbation ``e`` of every parameter with a gradient, and ``||T g||``.

        Pairs ``(parameter block, e of that block)``: under FSDP2 the block is this rank's
        shard (a plain tensor) and ``||T g||`` the global norm. Computed without a host
        synchronisation: when the gradient norm is not finite (a step the grad scaler will
        skip, or a diverged run) the scale is 0, so ``e`` is 0 where the gradient is finite and
        NaN where it is not.
        """
        entries = self._entries()
        if not entries:
            return [], torch.zeros(())
        grads = self._grads()
        scale, grad_norm = self._scale(entries, grads)
        e = [g.to(w.dtype, copy=True) for g, (w, _, _) in zip(grads, entries, strict=True)]
        self._shape(entries, e, scale)
        return [(w, x) for (w, _, _), x in zip(entries, e, strict=True)], grad_norm

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
        grads = self._grads()
        scale, grad_norm = self._scale(entries, grads)
        # Blocks: the whole parameters, or this rank's shards under FSDP2 (so the saved copy
        # is one copy of the local shard, not of the full model).
        params = [w for w, _, _ in entries]
        self._backup = params
        torch._foreach_copy_(self._saved_buffers(params), params)
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
            others = [local(p.grad) for _, p in self.named_params if p.grad is not None]
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


_NON_NEGATIVE = 0x7FFFFFFF


def _fisher_bits(grads: Sequence[Tensor]) -> Tensor:
    """``g^2`` of the (local blocks of the) gradients, flat, as int32 keys ordered like the
    floats: a non-negative float32's bit pattern is monotone in its value (NaN above inf)."""
    fisher = torch.cat([local(g).detach().reshape(-1).float().pow(2) for g in grads])
    return fisher.view(torch.int32) & _NON_NEGATIVE


def _split_masks(flat: Tensor, grads: Sequence[Tensor]) -> list[Tensor]:
    blocks = [local(g) for g in grads]
    sizes = [b.numel() for b in blocks]
    return [m.view(b.shape) for m, b in zip(flat.split(sizes), blocks, strict=True)]


@torch.no_grad()
def fisher_mask(grads: Sequence[Tensor], keep_ratio: float) -> list[Tensor]:
    """Global top-``keep_ratio`` mask of the empirical Fisher ``g^2`` (FSAM, Zhong et al. 2022).

    Returns one ``bool`` tensor per gradient (1 byte per parameter). Exactly
    ``max(1, int(N * keep_ratio))`` entries are kept: every entry above the threshold and, of
    those equal to it, the first in order (parameter by parameter, each flattened), so the mask
    is the same whatever ``torch.topk`` would pick among ties.

    Sharded gradients (FSDP2 ``DTensor``s, all ``Shard(0)`` on one 1-D device mesh) give the
    mask of this rank's block of each gradient, and the top-k is global: the threshold is found
    by a bisection on the ``g^2`` values with one all-reduce of a count per step (31 steps, no
    gathering of the gradients, nothing read on the host), and the tie rule follows the full
    tensors' order, so the masks are the blocks of the mask an unsharded run computes.
    """
    check_number("keep_ratio", keep_ratio, low=0, high=1, low_open=True)
    sharded = [is_sharded(g) for g in grads]
    if any(sharded):
        return _sharded_fisher_mask(grads, keep_ratio)
    sizes = [g.numel() for g in grads]
    total = sum(sizes)
    if total == 0:
        return [torch.zeros_like(g, dtype=torch.bool) for g in grads]
    keep = max(1, int(total * keep_ratio))
    # Transient copies of g^2 (and its int32 keys): the mask itself is one byte a parameter.
    bits = _fisher_bits(grads)
    threshold = torch.topk(bits, keep, sorted=False).values.min()
    above = bits > threshold
    ties = bits == threshold
    room = keep - above.sum()  # how many ties to keep (>= 1), a device tensor
    flat = above | (ties & (ties.cumsum(0, dtype=torch.int32) <= room))
    return _split_masks(flat, grads)


def _sharded_fisher_mask(grads: Sequence[Tensor], keep_ratio: float) -> list[Tensor]:
    """:func:`fisher_mask` of FSDP2 gradients (``Shard(0)`` on one 1-D mesh): local masks."""
    meshes = {g.device_mesh if is_sharded(g) else None for g in grads}
    placements = {tuple(g.placements) if is_sharded(g) else None for g in grads}
    if len(meshes) != 1 or None in meshes or placements != {(Shard(0),)}:
        raise ValueError(
            "FSAM's global top-k under sharding supports FSDP2's layout: every parameter a "
            "DTensor sharded Shard(0) on one 1-D data-parallel mesh (fully_shard on the model; "
            f"ModelParallelStrategy with tensor_parallel_size=1); got placements {placements}. "
            "Use SAM or ASAM for other layouts (their norm is global for any Shard/Replicate)."
        )
    (group,) = reduce_groups(grads[0])
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    total = sum(g.numel() for g in grads)  # global sizes
    keep = max(1, int(total * keep_ratio))
    bits = _fisher_bits(grads)
    device = bits.device

    def global_count(x: Tensor) -> Tensor:
        x = x.sum(dtype=torch.int64).reshape(1)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x[0]

    # Largest key T with count(keys >= T) >= keep: bisection on the 31-bit keys, on the device.
    lo = torch.zeros((), dtype=torch.int64, device=device)
    hi = torch.full((), _NON_NEGATIVE, dtype=torch.int64, device=device)
    for _ in range(31):
        mid = (lo + hi + 1) // 2
        enough = global_count(bits >= mid) >= keep
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid - 1)
    threshold = lo.to(torch.int32)
    above = bits > threshold
    ties = bits == threshold
    room = keep - global_count(above)
    # Ties in the full tensors' order: parameter by parameter, then by rank (Shard(0) blocks
    # are consecutive slices of the flattened parameter), then within the block.
    blocks = [local(g).numel() for g in grads]
    tie_counts = torch.stack([t.sum(dtype=torch.int64) for t in ties.split(blocks)])
    gathered = [torch.empty_like(tie_counts) for _ in range(world)]
    dist.all_gather(gathered, tie_counts, group=group)
    by_param = torch.stack(gathered, dim=1).reshape(-1)  # [param, rank] in the global order
    before = (by_param.cumsum(0) - by_param).view(len(grads), world)[:, rank]
    local_before = tie_counts.cumsum(0) - tie_counts
    # Rank of each tie in the global order, 1-based: ties before this block + within it.
    shift = torch.repeat_interleave(
        before - local_before, torch.tensor(blocks, device=device), output_size=sum(blocks)
    )
    order = ties.cumsum(0, dtype=torch.int64) + shift
    flat = above | (ties & (order <= room))
    return _split_masks(flat, grads)


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
        # Under FSDP2 the masks are of this rank's blocks, the top-k global across ranks.
        for (i, _), m in zip(targets, fisher_mask(grads, self.keep_ratio), strict=True):
            self.masks[i] = m
        self.has_mask = True

    def mask_state(self) -> list[Tensor | None]:
        """The masks as stored (``bool``, one byte a parameter), for checkpoints.

        Always the full parameters' masks, so a checkpoint is the same with or without
        sharding. Under FSDP2 the blocks are all-gathered (1 byte a parameter on every rank,
        at save time only): a collective, so every rank must call it, as Lightning does when
        it saves a checkpoint.
        """
        out: list[Tensor | None] = []
        for (_, p), m in zip(self.named_params, self.masks, strict=True):
            if m is not None and is_sharded(p):
                block = DTensor.from_local(
                    m.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
                m = block.full_tensor().bool()
            out.append(None if m is None else m.detach().cpu())
        return out

    def load_mask_state(self, masks: Sequence[Tensor | None]) -> None:
        if len(masks) != len(self.masks):
            raise ValueError(
                f"FSAM mask state holds {len(masks)} parameters but the model has "
                f"{len(self.masks)}; the checkpoint belongs to another model"
            )
        for i, ((_, p), m) in enumerate(zip(self.named_params, masks, strict=True)):
            if m is not None and tuple(m.shape) != tuple(p.shape):
                raise ValueError(
                    f"FSAM mask of {self.named_params[i][0]} has shape {tuple(m.shape)}, the "
                    f"parameter {tuple(p.shape)}; the checkpoint belongs to another model"
                )
            if m is not None and is_sharded(p):
                # This rank's block of the full mask (no communication).
                _, offsets = block_offsets(p)
                shape = local(p.detach()).shape
                m = m[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]
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
