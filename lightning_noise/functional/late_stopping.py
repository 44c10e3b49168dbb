"""Late Stopping, trainer-free: the round schedule and the first-time k-epoch learning selection.

Yuan, Feng and Liu, "Late Stopping: Avoiding Confidently Learning from Mislabeled Examples",
ICCV 2023 (arXiv:2308.13862; official code ``tmllab/2023_ICCV_LateStopping``).
:class:`~lightning_noise.callbacks.LateStopping` is the Lightning adapter.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["RoundPlan", "check_rates", "check_rounds", "fkl_selection", "round_schedule"]


@dataclass(frozen=True)
class RoundPlan:
    """One selection round: its 1-based number, FkL run length and target count."""

    round: int
    k: int
    target: int


def check_rates(rate: Any, stages: int) -> tuple[float, ...]:
    rates = (rate,) * stages if isinstance(rate, numbers.Real) else tuple(rate)
    if len(rates) != stages:
        raise ValueError(
            f"rate must be one number or one per k stage ({stages} for "
            f"rounds_per_k of length {stages}), got {rate!r}"
        )
    for value in rates:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"rate must hold numbers in (0, 1), got {rate!r}")
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"rate must be in (0, 1) (the kept fraction per round), got {rate!r}")
    return tuple(float(v) for v in rates)


def check_rounds(rounds_per_k: Any) -> tuple[int, ...]:
    if isinstance(rounds_per_k, numbers.Integral) or isinstance(rounds_per_k, str):
        raise ValueError(
            f"rounds_per_k must be a sequence (rounds with k=1, k=2, ...), got {rounds_per_k!r}"
        )
    rounds = tuple(rounds_per_k)
    for value in rounds:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"rounds_per_k must hold integers >= 0, got {rounds_per_k!r}")
    if sum(rounds) < 1:
        raise ValueError(f"rounds_per_k must schedule at least one round, got {rounds_per_k!r}")
    return tuple(int(v) for v in rounds)


def round_schedule(
    num_samples: int, rate: float | Sequence[float] = 0.955, rounds_per_k: Sequence[int] = (4, 4, 4)
) -> list[RoundPlan]:
    """The selection rounds: ``k`` and the target number of FkL examples of each.

    ``rounds_per_k[i]`` rounds use ``k = i + 1``; round ``r`` ends when
    ``int(num_samples * prod(rate of rounds 1..r))`` examples have reached FkL, the rate of a
    round being that of its k stage (the official code's ``remove_rate_1..3``).

    Example:
        >>> [(p.round, p.k, p.target) for p in round_schedule(45000, 0.955, (2, 1))]
        [(1, 1, 42975), (2, 1, 41041), (3, 2, 39194)]
    """
    rounds = check_rounds(rounds_per_k)
    rates = check_rates(rate, len(rounds))
    plans: list[RoundPlan] = []
    fraction = 1.0
    for stage, count in enumerate(rounds):
        for _ in range(count):
            fraction *= rates[stage]
            plans.append(RoundPlan(len(plans) + 1, stage + 1, int(num_samples * fraction)))
    return plans


def fkl_selection(learned: Tensor, current: Tensor) -> Tensor:
    """Sorted indices of ``current`` that reached first-time k-epoch learning.

    Args:
        learned: ``[N]`` bool over the full training set: whether each sample reached FkL in
            the round so far (``DynamicsStore.learned_mask(k, since=round start + warm-up)``).
        current: indices of the current training set.

    Example:
        >>> fkl_selection(torch.tensor([True, True, False]), torch.tensor([0, 2])).tolist()
        [0]
    """
    learned = learned.bool().cpu()
    current = current.long().cpu()
    return current[learned[current]].sort().values
