"""``torch.load`` with ``weights_only=True`` and an error of ours that names the file.

When a file does not load, torch's own message advises re-running with ``weights_only=False``
(which runs arbitrary code from the file). Callers here re-raise a ``ValueError`` that names the
file, says what was expected and how to fix it, and keeps torch's reason for the failure, minus
that advice.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_TORCH_DETAIL = "WeightsUnpickler error:"
_TORCH_DOCS = "Check the documentation of torch.load"


def load_error_reason(err: BaseException) -> str:
    """One line saying why a load failed, without torch's advice about ``weights_only``."""
    text = str(err)
    if _TORCH_DETAIL in text:
        text = text.split(_TORCH_DETAIL, 1)[1].split(_TORCH_DOCS, 1)[0]
    for line in text.splitlines():
        line = line.strip().split(" Please use `torch.serialization", 1)[0].strip()
        if line and "weights_only" not in line:
            return f"{type(err).__name__}: {line}"
    if isinstance(err, EOFError):
        return "the file is empty or ends too early"
    return type(err).__name__


def safe_torch_load(
    path: str | Path, *, what: str, fix: str, safe_globals: Iterable[Any] = ()
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``ValueError`` naming ``path`` if not.

    Args:
        path: the file.
        what: what the file should be, e.g. ``"a dynamics export (dynamics.pt)"``.
        fix: what to do about a bad file, e.g. ``"re-run training to write it again"``.
        safe_globals: extra globals the file may reference (``torch.serialization.safe_globals``).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file does not load (``from None``: the reason is in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: expected {what}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = load_error_reason(err)
    # Outside the except block, so that torch's message (and its advice) is not chained.
    raise ValueError(
        f"{str(path)!r} is not {what}: it could not be loaded ({reason}). Only tensors, numbers "
        f"and plain containers are loaded from a file, so no code in it runs; {fix}"
    )
