"""Choosing the implementation of a kernel: Triton on CUDA (or the Triton interpreter), else
PyTorch.

``impl="auto"`` runs Triton when the tensors are on a CUDA device, or when the environment
sets ``TRITON_INTERPRET=1`` (Triton's interpreter then runs the same kernels on the CPU with
NumPy: that is how the tests exercise them without a GPU), and PyTorch otherwise. Triton reads
``TRITON_INTERPRET`` when it is first imported, so the variable must be set before that
(in the environment; the test suite's ``conftest.py`` sets it first thing).
``impl="triton"`` insists on Triton and fails clearly where it cannot run; ``impl="torch"``
always runs the PyTorch path, which is also the tests' oracle for the fused options.

Every Triton launch is counted in :data:`LAUNCHES` (by kernel name), so a test can prove that
the Triton path really ran rather than silently falling back.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import Counter

import torch
from torch import Tensor

__all__ = [
    "IMPLS",
    "LAUNCHES",
    "check_impl",
    "interpreting",
    "resolve_impl",
    "triton_available",
]

IMPLS = ("auto", "triton", "torch")

#: Number of Triton kernel launches per kernel name since import.
LAUNCHES: Counter[str] = Counter()


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`IMPLS`, else a ``ValueError`` naming them."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


#: Answers that hold for the whole process, computed once (a dict rather than functools.cache,
#: whose wrapper torch.compile warns about; ``assume_constant_result`` makes it call these while
#: tracing and keep the answer as a constant instead of tracing the import machinery inside).
_ONCE: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    if "triton" not in _ONCE:
        _ONCE["triton"] = importlib.util.find_spec("triton") is not None
    return _ONCE["triton"]


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@torch.compiler.assume_constant_result
def _interpreter_ready() -> bool:
    """Whether Triton's language was imported in interpreter mode. ``triton.language``
    binds its library functions (``tl.max``, ...) for one mode when first imported, so
    ``TRITON_INTERPRET=1`` only works when set before anything imports Triton."""
    if "interpreter" not in _ONCE:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        _ONCE["interpreter"] = isinstance(tl.max, InterpretedFunction)
    return _ONCE["interpreter"]


_LATE_INTERPRET = (
    "TRITON_INTERPRET=1 was set after Triton was imported (Triton binds its interpreter at "
    "import); set it in the environment before Python starts"
)


def resolve_impl(impl: str, tensor: Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` on ``tensor``'s device (see the module doc).

    Under ``torch.compile`` the choice is made once, while tracing, and the graph calls the
    chosen path's custom operator (``torch.ops.lightning_noise.*``).
    """
    if check_impl(impl) == "torch":
        return "torch"
    on_cpu = triton_available() and interpreting() and tensor.is_cpu
    late = on_cpu and not _interpreter_ready()
    runnable = triton_available() and (tensor.is_cuda or (on_cpu and not late))
    if impl == "auto":
        if late:
            warnings.warn(f"{_LATE_INTERPRET}; running the PyTorch path", stacklevel=3)
        return "triton" if runnable else "torch"
    if not triton_available():
        raise RuntimeError(
            "impl='triton' needs the triton package (Linux: pip install triton); "
            "use impl='auto' or impl='torch' to run the PyTorch path"
        )
    if late:
        raise RuntimeError(_LATE_INTERPRET)
    if not runnable:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {tensor.device}); on the CPU set "
            "TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, or use "
            "impl='auto' / impl='torch'"
        )
    return "triton"
