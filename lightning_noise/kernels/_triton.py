"""Launchers of the Triton kernels in :mod:`lightning_noise.kernels._triton_kernels`.

Kernels are wrapped with ``triton.jit`` at first use and cached per mode (compiled or
interpreted), so ``TRITON_INTERPRET`` may be set any time before the first call.

**Tiles.** Each program handles ``BLOCK_R`` rows and loops over the columns ``BLOCK_C`` at a
time. Compiled on a GPU, ``BLOCK_C``, ``num_warps`` and ``num_stages`` are **autotuned**
(``triton.autotune``) per number of columns ``V`` and per dtype of the arguments: the first
call with a new ``(V, dtype)`` times the candidate configurations of :func:`_configs` that
suit ``V`` (:func:`_prune`) and keeps the fastest for every later call (a one-time cost of a
few seconds per kernel and key). ``BLOCK_R`` follows from ``BLOCK_C`` and the number of rows
(:func:`_rows_per_program`: a tile of about 4096 elements), so a new
batch size never re-tunes. ``LIGHTNING_NOISE_AUTOTUNE=0`` skips the timing and uses the fixed
heuristic of :func:`_tiles` (blocks of up to 4096 float32 / 8192 16-bit columns). In the
interpreter, which pays per program rather than per element, the configuration is the single
one of :func:`_tiles` (tiles of up to 65536 elements); it goes through the same autotuner
wrapper, pruned to that one configuration, so the launch path the GPU takes is the one the
CPU tests run. ``TRITON_PRINT_AUTOTUNING=1`` prints each choice; :func:`chosen_config`
returns it.

Triton launches a kernel on the current CUDA device, not on the device of its arguments, so
every launch runs under :func:`on_device` of its input: a tensor on a GPU other than the
current one is then computed on its own GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch import Tensor

from lightning_noise.kernels._dispatch import LAUNCHES, interpreting

__all__ = [
    "ce_backward",
    "ce_forward",
    "chosen_config",
    "on_device",
    "softmax_backward",
    "softmax_forward",
]

#: Environment variable: "0" turns the GPU autotuning off (the fixed heuristic of ``_tiles``).
AUTOTUNE_ENV = "LIGHTNING_NOISE_AUTOTUNE"

#: Outputs a kernel may write over its own input (``ce_backward(..., out=x)``): the autotuner
#: restores them after each timed trial, so tuning never changes a result.
_RESTORE = {"ce_backward": ["DX"], "softmax_backward": ["DX"]}


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _is_16bit(dtype: Any) -> bool:
    return str(dtype).rsplit(".", 1)[-1] in ("float16", "bfloat16", "fp16", "bf16")


def _tile_elements(interpret: bool) -> int:
    """Elements a program holds at once: the interpreter pays per program, a GPU per register."""
    return 65536 if interpret else 4096


def _rows_per_program(n_rows: int, block_c: int, tile: int) -> int:
    return max(1, min(_next_pow2(n_rows), tile // block_c))


def _tiles(
    n_rows: int, n_cols: int, dtype: torch.dtype, *, interpret: bool | None = None
) -> tuple[int, int, int]:
    """The fixed heuristic ``(BLOCK_R, BLOCK_C, num_warps)`` for a ``[n_rows, n_cols]`` matrix,
    in the interpreter or compiled (``interpret=None``: as :func:`interpreting` says). Compiled,
    it is the configuration used when autotuning is off."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        block_c = min(_next_pow2(n_cols), 8192)
        return _rows_per_program(n_rows, block_c, 65536), block_c, 4
    widest = 8192 if _is_16bit(dtype) else 4096
    block_c = min(_next_pow2(n_cols), widest)
    block_r = _rows_per_program(n_rows, block_c, _tile_elements(interpret=False))
    tile = block_r * block_c
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return block_r, block_c, num_warps


def _configs() -> list[Any]:
    """The candidates the GPU autotuner times: column blocks of 2048 to 16384 elements, 4 to 16
    warps, 1 or 2 pipeline stages (pruned per ``V`` and dtype by :func:`_prune`; at most 24
    compilations per kernel and dtype, shared by every ``V`` that is a multiple of 16)."""
    import triton

    return [
        triton.Config({"BLOCK_C": block_c}, num_warps=warps, num_stages=stages)
        for block_c in (2048, 4096, 8192, 16384)
        for warps in (4, 8, 16)
        for stages in (1, 2)
    ]


def _dtype_of(named_args: dict[str, Any]) -> Any:
    first = next(iter(named_args.values()))
    return getattr(first, "dtype", torch.float32)


def _prune(interpret: bool, configs: list[Any], named_args: dict[str, Any], **_: Any) -> list[Any]:
    """The candidates that suit this call's ``V`` (``n_cols``) and dtype.

    Interpreted, or with autotuning off: the one configuration of :func:`_tiles`. Compiled:
    no column block wider than ``V`` needs (blocks past ``next_pow2(V)`` collapse into it), at
    most 64 elements of a tile per thread (more spills registers), float32 blocks of at most
    8192 columns; duplicates removed.
    """
    import triton

    n_rows, n_cols = int(named_args["n_rows"]), int(named_args["n_cols"])
    dtype = _dtype_of(named_args)
    if interpret or not _autotune_enabled():
        _, block_c, warps = _tiles(n_rows, n_cols, dtype, interpret=interpret)
        return [triton.Config({"BLOCK_C": block_c}, num_warps=warps, num_stages=1)]
    tile = _tile_elements(interpret=False)
    widest = 16384 if _is_16bit(dtype) else 8192
    cap = max(configs[0].kwargs["BLOCK_C"], _next_pow2(n_cols))
    kept: dict[tuple[int, int, int], Any] = {}
    for config in configs:
        block_c = min(config.kwargs["BLOCK_C"], _next_pow2(n_cols))
        if config.kwargs["BLOCK_C"] > min(cap, widest):
            continue
        if max(tile, block_c) > 64 * 32 * config.num_warps:
            continue
        key = (block_c, config.num_warps, config.num_stages)
        kept.setdefault(
            key,
            triton.Config(
                {"BLOCK_C": block_c}, num_warps=config.num_warps, num_stages=config.num_stages
            ),
        )
    return list(kept.values())


@functools.cache
def _jit(name: str, interpret: bool):  # the mode is only part of the cache key
    import triton

    from lightning_noise.kernels import _triton_kernels

    kernel = triton.jit(getattr(_triton_kernels, name))
    tile = _tile_elements(interpret)
    values = {"BLOCK_R": lambda a: _rows_per_program(a["n_rows"], a["BLOCK_C"], tile)}
    if name.startswith("softmax"):
        values["SINGLE"] = lambda a: a["BLOCK_C"] >= a["n_cols"]
    return triton.autotune(
        configs=_configs(),
        key=["n_cols"],  # and, added by Triton, the dtype of every tensor argument
        prune_configs_by={"early_config_prune": functools.partial(_prune, interpret)},
        restore_value=_RESTORE.get(name),
    )(triton.heuristics(values)(kernel))


def chosen_config(
    name: str, n_cols: int | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any] | None:
    """The configuration (``BLOCK_C``, ``num_warps``, ``num_stages``) kernel ``name`` uses in
    this mode: for ``n_cols`` columns (and ``dtype``) when given, else that of its last launch;
    ``None`` when it has not been launched so."""
    tuner = _jit(name, interpreting())
    if n_cols is None:
        best = getattr(tuner, "best_config", None)
    else:
        best = next(
            (
                config
                for key, config in tuner.cache.items()
                if key[0] == n_cols and (dtype is None or str(dtype) in key[1:])
            ),
            None,
        )
    if best is None:
        return None
    return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (it makes that GPU current for the
    launch, and restores the previous one after); a context that does nothing elsewhere (the
    CPU, where the interpreter runs)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _kernel(name: str):
    LAUNCHES[name] += 1
    return _jit(name, interpreting())


def _grid(n_rows: int):
    """The launch grid: one program per ``BLOCK_R`` rows, once the tuner has chosen them."""
    return lambda meta: ((n_rows + meta["BLOCK_R"] - 1) // meta["BLOCK_R"],)


def softmax_forward(x: Tensor) -> Tensor:
    """Row softmax of a ``[n, c]`` matrix with contiguous columns."""
    n, c = x.shape
    y = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    with on_device(x.device):
        _kernel("softmax_forward")[_grid(n)](x, y, n, c, x.stride(0), y.stride(0))
    return y


def softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    n, c = y.shape
    dx = torch.empty((n, c), dtype=y.dtype, device=y.device)
    if n == 0:
        return dx
    with on_device(y.device):
        _kernel("softmax_backward")[_grid(n)](
            y, dy, dx, n, c, y.stride(0), dy.stride(0), dx.stride(0)
        )
    return dx


def ce_forward(
    x: Tensor, target: Tensor, ignore_index: int, eps: float, alpha: float, zl: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)`` of a ``[n, c]`` logit matrix (float32, float32, int32).

    The arg-max is computed only for MaxSup (``alpha > 0``), the row sum only for it or label
    smoothing: without them the kernel is compiled without either (its arg-max output is 0).
    """
    n, c = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    amax = torch.empty(n, dtype=torch.int32, device=x.device)
    if n == 0:
        return loss, lse, amax
    with on_device(x.device):
        _kernel("ce_forward")[_grid(n)](
            x,
            target,
            loss,
            lse,
            amax,
            n,
            c,
            x.stride(0),
            ignore_index,
            eps,
            alpha,
            zl,
            NEED_MEAN=eps > 0.0 or alpha > 0.0,
            NEED_AMAX=alpha > 0.0,
        )
    return loss, lse, amax


def ce_backward(
    x: Tensor,
    target: Tensor,
    lse: Tensor,
    amax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    eps: float,
    alpha: float,
    zl: float,
    out: Tensor | None = None,
) -> Tensor:
    """Gradient of ``sum_i grad_rows[i] * loss_i`` with respect to ``x``, written to ``out``
    (a new tensor like ``x`` by default; ``out`` may be ``x`` itself)."""
    n, c = x.shape
    dx = torch.empty((n, c), dtype=x.dtype, device=x.device) if out is None else out
    if n == 0:
        return dx
    with on_device(x.device):
        _kernel("ce_backward")[_grid(n)](
            x,
            target,
            lse,
            amax,
            grad_rows,
            dx,
            n,
            c,
            x.stride(0),
            dx.stride(0),
            ignore_index,
            eps,
            alpha,
            zl,
            NEED_AMAX=alpha > 0.0,
        )
    return dx
