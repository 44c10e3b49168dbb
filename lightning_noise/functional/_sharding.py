"""What the cores need to know about sharded tensors (FSDP2's ``DTensor``), torch only.

Under Lightning's ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) every parameter and
gradient is a ``torch.distributed.tensor.DTensor``: each rank holds one block of the full tensor
(``Shard(dim)`` on a mesh dimension) or a full copy (``Replicate()``). The cores work on the
local blocks and reduce what must be global (a norm, a count) over the process groups of the
mesh dimensions a tensor is sharded on. Plain tensors (single device, DDP) pass through
unchanged: their reduction groups are empty and their block is the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:  # torch builds without distributed support have no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - such builds are not tested here
    dist = None  # type: ignore[assignment]
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "block_offsets",
    "full_cpu_copy",
    "is_sharded",
    "local",
    "placed_like",
    "reduce_groups",
    "sum_over_shards",
]


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient under FSDP2 / tensor parallel)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The block of ``t`` this rank holds (``t`` itself for a plain tensor).

    Call it under ``torch.no_grad()``: the result then shares storage with ``t``, so an in-place
    change of the block changes ``t`` (what optimizers do to FSDP2's sharded parameters).
    """
    return t.to_local() if is_sharded(t) else t


def _placements(t: Tensor) -> list[tuple[int, object]]:
    """``(mesh dim, placement)`` of a DTensor; only ``Shard`` and ``Replicate`` are supported."""
    out = []
    for mesh_dim, placement in enumerate(t.placements):
        if type(placement) is not Shard and not isinstance(placement, Replicate):
            raise ValueError(
                f"a sharded tensor with placement {placement} on mesh dimension {mesh_dim} is "
                "not supported; parameters and gradients must be Shard(dim) or Replicate() "
                "(FSDP2's fully_shard gives Shard(0))"
            )
        out.append((mesh_dim, placement))
    return out


def reduce_groups(t: Tensor) -> tuple[object, ...]:
    """Process groups over which a per-block partial sum of ``t`` adds up to the global sum.

    One group per mesh dimension ``t`` is sharded on (``Replicate`` dimensions hold copies and
    are not summed); empty for a plain tensor.
    """
    if not is_sharded(t):
        return ()
    mesh = t.device_mesh
    return tuple(
        mesh.get_group(mesh_dim) for mesh_dim, pl in _placements(t) if isinstance(pl, Shard)
    )


def sum_over_shards(values: Sequence[Tensor], groups: Sequence[tuple[object, ...]]) -> Tensor:
    """``sum_i values[i]`` where each value is a per-rank partial summed over ``groups[i]``.

    Values with the same groups are added locally first, so FSDP2 (one mesh) costs one
    all-reduce. Each value is a 0-d (or same-shape) device tensor; nothing is read on the host.
    """
    buckets: dict[tuple[object, ...], Tensor] = {}
    for value, key in zip(values, groups, strict=True):
        buckets[key] = value if key not in buckets else buckets[key] + value
    total: Tensor | None = None
    for key, value in buckets.items():
        if key:
            value = value.clone()  # all_reduce works in place: never on a caller's tensor
        for group in key:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        total = value if total is None else total + value
    assert total is not None, "sum_over_shards needs at least one value"
    return total


def block_offsets(t: Tensor) -> tuple[torch.Size, tuple[int, ...]]:
    """``(global shape, offset of this rank's block in it)``; offsets are 0 for a plain tensor.

    DTensor's ``Shard(d)`` splits dimension ``d`` as ``torch.chunk`` does (blocks of
    ``ceil(n / ranks)``, the last ones shorter or empty); two mesh dimensions sharding the same
    tensor dimension split the first one's block again, in mesh order.
    """
    shape = torch.Size(t.shape)
    offsets = [0] * len(shape)
    if not is_sharded(t):
        return shape, tuple(offsets)
    sizes = list(shape)
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return shape, tuple(offsets)
    for mesh_dim, placement in _placements(t):
        if not isinstance(placement, Shard):
            continue
        d = placement.dim % len(shape)
        ranks = mesh.size(mesh_dim)
        chunk = -(-sizes[d] // ranks)  # ceil
        start = min(coordinate[mesh_dim] * chunk, sizes[d])
        offsets[d] += start
        sizes[d] = max(0, min(chunk, sizes[d] - start))
    return shape, tuple(offsets)


def full_cpu_copy(t: Tensor) -> Tensor:
    """A detached CPU copy of the whole of ``t``: a ``DTensor`` is gathered to its full tensor
    first (a collective: under FSDP2 every rank must call it, in the same order)."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def placed_like(full: Tensor, current: Tensor) -> Tensor:
    """``full`` laid out as ``current``: for a ``DTensor`` ``current``, this rank's block of
    ``full`` on ``current``'s mesh and placements (sliced locally, no communication: every
    rank holds ``full``); ``full`` itself otherwise."""
    if not is_sharded(current):
        return full
    from torch.distributed.tensor import distribute_tensor

    device = current.to_local().device
    return distribute_tensor(
        full.to(device), current.device_mesh, current.placements, src_data_rank=None
    )
