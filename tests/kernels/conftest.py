"""The kernel tests' device switch.

By default the Triton kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set per test by the ``interpret`` fixture). With ``LIGHTNING_NOISE_TEST_DEVICE=cuda`` (set by
``benchmarks/gpu_check.sh``) they run compiled on the GPU: ``tests/conftest.py`` leaves
``TRITON_INTERPRET`` unset, ``interpret`` does nothing, and each test module's
``cross_entropy``, ``softmax`` and ``linear_cross_entropy`` are wrapped so that their tensor
arguments move to the GPU and their result back to the caller's device. Both moves are
differentiable, so every test still builds its inputs and checks values and gradients on the
CPU against the same references, unchanged. Caveats on CUDA: a strided input that is not dense
(``x[:, ::3]``) reaches the kernel contiguous (``Tensor.to`` keeps only dense strides), and a
CPU ``torch.autocast`` region becomes a CUDA one of the same dtype around the kernel call.
Tests of CPU-only behaviour (:data:`CPU_ONLY`) are skipped on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import pytest
import torch

TEST_DEVICE = os.environ.get("LIGHTNING_NOISE_TEST_DEVICE", "cpu").strip().lower()
KERNELS = ("cross_entropy", "softmax", "linear_cross_entropy")

#: Tests of CPU-only behaviour, skipped when the kernels run on CUDA, and why.
CPU_ONLY = {
    "test_dispatch_and_errors": "checks dispatch of CPU tensors with and without the interpreter",
    "test_every_launch_runs_on_its_inputs_device": "a CPU stand-in for a two-GPU check",
    "test_cpu_benchmark_checks_and_measures_memory": "benchmarks/kernels.py's CPU mode",
    "test_benchmark_times_each_run_from_a_cleared_gradient": (
        "the benchmark's timing loop on CPU tensors (gpu_check.sh runs the benchmark itself)"
    ),
}


def pytest_collection_modifyitems(config, items) -> None:
    if TEST_DEVICE != "cuda":
        return
    here = Path(__file__).parent
    mine = [item for item in items if here in Path(str(item.path)).parents]
    if mine and not torch.cuda.is_available():
        raise pytest.UsageError("LIGHTNING_NOISE_TEST_DEVICE=cuda, but torch sees no CUDA GPU")
    for item in mine:
        reason = CPU_ONLY.get(getattr(item, "originalname", item.name))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"CPU only: {reason}"))


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for CPU tensors; nothing on CUDA, where the kernels are compiled."""
    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def on_cuda(fn):
    """``fn`` run on the GPU: tensor arguments moved there, the result moved back."""

    def move(value):
        return value.to("cuda") if isinstance(value, torch.Tensor) else value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        home = tensors[0].device if tensors else torch.device("cpu")
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled("cpu"):
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cpu"))
        with autocast:
            out = fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        return out.to(home)

    return wrapper


@pytest.fixture(autouse=True, scope="module")
def _kernels_on_test_device(request):
    """On CUDA, wrap the module's kernel entry points with :func:`on_cuda`. Module-scoped:
    hypothesis refuses function-scoped fixtures around its ``@given`` tests."""
    if TEST_DEVICE != "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        for name in KERNELS:
            fn = getattr(request.module, name, None)
            if fn is not None:
                patch.setattr(request.module, name, on_cuda(fn))
        yield
