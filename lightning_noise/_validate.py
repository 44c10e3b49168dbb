"""The one home of argument checks (DESIGN.md protocol 7: bad input fails early and clearly).

Every constructor and function of the package checks its hyperparameters with these helpers,
so that one kind of mistake always reads the same way: the argument's name, the allowed
values and what was given, e.g. ``rho must be in (0, inf], got -1.0``. A ``hint`` names the
usual values or the fix (``"(the paper uses 0.05)"``). Python only: no torch, no Lightning.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["check_choice", "check_int", "check_number", "check_strategy", "is_int", "is_real"]

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``bool`` is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (``bool`` is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _suffix(hint: str) -> str:
    return f" {hint}" if hint else ""


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite float within the given bounds, else a ``ValueError``.

    Example:
        >>> check_number("rho", 0.05, low=0, low_open=True)
        0.05
        >>> check_number("rho", 0, low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: rho must be in (0, inf), got 0
    """
    left = "(" if low_open else "["
    right = ")" if high_open or high is None else "]"
    bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    message = f"{name} must be in {bounds}, got {value!r}{_suffix(hint)}"
    if not is_real(value):
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}{_suffix(hint)}")
    number = float(value)
    ok = True
    if low is not None:
        ok = number > low if low_open else number >= low
    if high is not None:
        ok = ok and (number < high if high_open else number <= high)
    if not ok:
        raise ValueError(message)
    return number


def check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = False, hint: str = ""
) -> int | None:
    """``value`` as an ``int`` (``>= minimum``), or ``None`` when ``optional``; else ``ValueError``.

    Example:
        >>> check_int("k", 3, minimum=1)
        3
        >>> check_int("num_samples", None, minimum=0, optional=True) is None
        True
    """
    if optional and value is None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        what = "an integer" if minimum is None else f"an integer >= {minimum}"
        if optional:
            what = f"None or {what}"
        raise ValueError(f"{name} must be {what}, got {value!r}{_suffix(hint)}")
    return int(value)


def check_choice(name: str, value: T, choices: Iterable[Any], *, hint: str = "") -> T:
    """``value`` when it is one of ``choices``, else a ``ValueError`` listing them.

    Example:
        >>> check_choice("perturbation", "local", ("global", "local"))
        'local'
    """
    allowed = tuple(choices)
    if value not in allowed:
        listed = ", ".join(repr(c) for c in allowed)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}{_suffix(hint)}")
    return value


def check_strategy(owner: str, strategy: object, refused: Mapping[str, str]) -> None:
    """Refuse a training strategy at setup: ``RuntimeError`` with the reason and the fix.

    ``refused`` maps strategy class names (a subclass counts as its base, e.g. any
    ``DeepSpeedStrategy``) to the reason, which names what to use instead. Names, not classes,
    so that nothing here imports Lightning (or needs DeepSpeed installed).

    Example:
        >>> class DeepSpeedStrategy: ...
        >>> check_strategy("SAM", DeepSpeedStrategy(), {"DeepSpeedStrategy": "use 'ddp'"})
        Traceback (most recent call last):
        ...
        RuntimeError: SAM does not support DeepSpeedStrategy: use 'ddp'
    """
    for cls in type(strategy).__mro__:
        reason = refused.get(cls.__name__)
        if reason is not None:
            raise RuntimeError(f"{owner} does not support {type(strategy).__name__}: {reason}")
