"""FSDP2 for the ready models: ``fully_shard`` the networks of a module in ``configure_model``.

Lightning's ``ModelParallelStrategy`` (``data_parallel_size=N, tensor_parallel_size=1``) sets
up a device mesh and calls the LightningModule's ``configure_model``, where the model is
sharded with PyTorch's ``fully_shard`` (FSDP2). :func:`shard_networks` is that step for
:class:`~lightning_noise.models.ImageClassifier` (one timm backbone) and
:class:`~lightning_noise.models.CoTeachingClassifier` (two), and for a user's own module.
Under any other strategy it does nothing, so the same module trains on one device, under DDP
and under FSDP2.

What is sharded, found by structure (no per-architecture list):

* the **blocks** of each network: the children of its top-level block containers, the
  ``nn.Sequential`` / ``nn.ModuleList`` children named ``blocks``, ``stages``, ``layers`` or
  ``layer<N>`` (timm's ViTs and EfficientNets, ConvNeXts, Swins, ResNets and our
  pre-activation ResNets). A network without such a container (``coteaching_cnn``, a small
  MLP) has each top-level child that holds parameters as a block;
* then each **network** itself, which takes what is left (a stem, a final norm, the head).

Each block is one FSDP2 unit: its parameters are all-gathered just before its forward and
freed after it, and its gradients are reduce-scattered as soon as they are ready, so the
memory of the full weights is that of one block at a time. Each network is its own FSDP2
root (not the LightningModule): Co-teaching calls its two networks directly, never the
module's ``forward``, and FSDP2 starts every forward at a root. The networks must therefore
hold every parameter of the module; a parameter outside them (a criterion with learnable
weights, say) would not be synchronised across ranks, and is refused with its name.

**Running statistics.** FSDP2 shards parameters, not buffers: each rank would update its own
BatchNorm running mean and variance from its own batches, so validation would run a
different model on each rank and a distributed checkpoint (which writes each replicated
tensor once, from whichever rank its planner picks) would mix ranks' statistics. DDP
broadcasts rank zero's buffers before each forward; here, after each training forward of a
network, its running statistics are broadcast from the mesh's rank zero (one broadcast per
dtype), so every rank holds rank zero's statistics, as under DDP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["block_units", "fsdp2_mesh", "running_statistics", "shard_networks"]

#: Names of the top-level children whose children are the network's repeated blocks.
BLOCK_CONTAINERS = re.compile(r"blocks|stages|layers|layer\d+")


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def block_units(network: nn.Module) -> list[nn.Module]:
    """The submodules of ``network`` that ``fully_shard`` wraps one by one (see the module
    docstring): the children of its block containers, else its top-level children that hold
    parameters.

    Example:
        >>> from lightning_noise.models import create_backbone
        >>> net = create_backbone("resnet18", num_classes=10)
        >>> [type(b).__name__ for b in block_units(net)].count("BasicBlock")
        8
        >>> len(block_units(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))))
        2
    """
    containers = [
        child
        for name, child in network.named_children()
        if BLOCK_CONTAINERS.fullmatch(name) and isinstance(child, nn.Sequential | nn.ModuleList)
    ]
    if containers:
        return [block for c in containers for block in c.children() if _has_parameters(block)]
    return [child for child in network.children() if _has_parameters(child)]


def running_statistics(network: nn.Module) -> list[Tensor]:
    """The buffers a training forward updates: the running mean, variance and batch count of
    each BatchNorm / InstanceNorm that tracks running statistics."""
    return [
        buffer
        for m in network.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]


def _sync_running_statistics(network: nn.Module, mesh: object) -> None:
    """After each training forward of ``network``, broadcast its running statistics from the
    mesh's rank zero (see the module docstring)."""
    group = mesh.get_group()
    if not running_statistics(network) or torch.distributed.get_world_size(group) == 1:
        return
    source = torch.distributed.get_global_rank(group, 0)

    @torch.compiler.disable  # a collective between the compiled pieces, not traced
    def hook(module: nn.Module, args: object, output: object) -> None:
        if not module.training:
            return
        # Looked up at each call: moving the model to its device replaces the buffers.
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for buffer in running_statistics(module):
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        with torch.no_grad():
            for buffers in by_dtype.values():
                flat = torch.cat([b.reshape(-1) for b in buffers])
                torch.distributed.broadcast(flat, src=source, group=group)
                # Through .data: the batch-norm node saved these buffers for its backward (it
                # reads them only in eval mode), and an in-place write to the tensors
                # themselves would bump their version and fail that backward.
                for b, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
                    b.data.copy_(part.view_as(b))

    network.register_forward_hook(hook)


def fsdp2_mesh(module: pl.LightningModule) -> object | None:
    """The data-parallel mesh to shard ``module`` on, or ``None`` when its trainer's strategy
    is not ``ModelParallelStrategy`` (one device, DDP, ...: nothing to shard).

    Raises:
        RuntimeError: under tensor parallelism (``tensor_parallel_size > 1``), which these
            models do not lay out (they have no tensor-parallel plan).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = module._trainer
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return None
    mesh = module.device_mesh
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise RuntimeError(
            f"{type(module).__name__} shards with FSDP2 (data parallelism) only, got "
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}; use "
            "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1), or write a "
            "configure_model with your own tensor-parallel plan in a subclass"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_networks(module: pl.LightningModule, networks: Sequence[nn.Module]) -> bool:
    """``fully_shard`` each of ``networks`` (blocks first, then the network) on the
    data-parallel mesh when ``module`` trains under ``ModelParallelStrategy``; returns whether
    it sharded. Call it from ``configure_model``; a second call (``fit`` then ``test``) finds
    the networks sharded and leaves them.

    Raises:
        RuntimeError: under tensor parallelism, or when a parameter of ``module`` lies
            outside ``networks`` (it would be neither sharded nor synchronised).
    """
    mesh = fsdp2_mesh(module)
    if mesh is None:
        return False
    from torch.distributed.fsdp import FSDPModule, fully_shard

    inside = {id(p) for net in networks for p in net.parameters()}
    outside = [name for name, p in module.named_parameters() if id(p) not in inside]
    if outside:
        raise RuntimeError(
            f"{type(module).__name__} shards its networks with FSDP2, but the parameters "
            f"{outside[:5]} lie outside them and would not be synchronised across ranks; move "
            "them into a network, or write your own configure_model (docs/scaling.md)"
        )
    for net in networks:
        if isinstance(net, FSDPModule):
            continue
        for block in block_units(net):
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
        _sync_running_statistics(net, mesh)
    return True
