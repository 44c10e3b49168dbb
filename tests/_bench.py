"""Load a ``benchmarks/`` script in a test without leaving ``benchmarks/`` on ``sys.path``.

The scripts put their own folder on ``sys.path`` (for ``common``). Left there, the folder's
``kernels.py`` answers for the top-level name ``kernels``, which transformers probes for the
Hugging Face ``kernels`` package (``importlib.util.find_spec("kernels")``) and then imports
from: every Hugging Face test that ran after failed with "cannot import name
'CUDAProperties' from 'kernels' (benchmarks/kernels.py)". For the same reason
``benchmarks/kernels.py`` itself is loaded under another module name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str, *, module_name: str | None = None) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``module_name`` (default ``name``), loaded once
    and kept in ``sys.modules``; ``common``, which the scripts import, is imported while the
    folder is on the path, and ``sys.path`` is restored after."""
    module_name = module_name or name
    if module_name in sys.modules:
        return sys.modules[module_name]
    saved = list(sys.path)
    sys.path.insert(0, str(FOLDER))
    try:
        importlib.import_module("common")
        spec = importlib.util.spec_from_file_location(module_name, FOLDER / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # its dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    finally:
        sys.path[:] = saved
