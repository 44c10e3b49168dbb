"""Suite-wide settings. Its presence also puts tests/ on sys.path for `_formats`."""

from __future__ import annotations

import os
import sys

import pytest

# Where the kernel tests run: "cpu" (the default) in Triton's interpreter, or "cuda" compiled
# for the GPU (benchmarks/gpu_check.sh; tests/kernels/conftest.py moves the kernels' inputs).
TEST_DEVICE = os.environ.get("LIGHTNING_NOISE_TEST_DEVICE", "cpu").strip().lower()
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"LIGHTNING_NOISE_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
# Triton's interpreter runs the kernels on the CPU; Triton reads this when first imported, so
# it is set before anything (torch, Lightning) may import Triton. On CUDA it must stay unset,
# else every kernel would be interpreted (on copies in host memory) instead of compiled.
if TEST_DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test may need the W&B service or a display.
os.environ.setdefault("WANDB_MODE", "offline")

import matplotlib  # noqa: E402 (after the environment above, on purpose)

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """Each test leaves ``sys.path`` as it found it: a benchmark script loaded by a test puts
    ``benchmarks/`` there, whose ``kernels.py`` then shadows the ``kernels`` package that
    transformers looks for (tests/_bench.py)."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved
