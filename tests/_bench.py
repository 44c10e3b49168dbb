"""Import a ``benchmarks/`` script in a test without leaving ``benchmarks/`` on ``sys.path``.

The scripts put their own folder on ``sys.path`` (for ``common``). Left there, the folder's
``kernels.py`` answers for the top-level name ``kernels``, which transformers probes for the
Hugging Face ``kernels`` package (``importlib.util.find_spec("kernels")``) and then imports
from: every Hugging Face test that ran after failed with "cannot import name
'CUDAProperties' from 'kernels' (benchmarks/kernels.py)".
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name`` (with ``common``, which the scripts
    import, also imported while the folder is on the path); ``sys.path`` is restored."""
    saved = list(sys.path)
    sys.path.insert(0, str(FOLDER))
    try:
        importlib.import_module("common")
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved
