"""``NoiseRateEstimate``: the noise rate a method uses when it is not told the true one.

On a user's data the noise rate is unknown, yet Co-teaching's forget rate, small-loss
selection and the label audit's budget are set from it. :class:`NoiseRateEstimate` estimates it
during the run from the per-sample losses that
:class:`~lightning_noise.dynamics.TrainingDynamics` records: at the start of each training
epoch ``e`` it fits a two-component Gaussian mixture to the losses of epoch ``e - 1``
(DivideMix's mixture, Li et al. ICLR 2020;
:func:`~lightning_noise.functional.noise_rate.estimate_noise_rate`) and keeps the fraction of
samples in the high-loss component. It refits up to the losses of epoch ``until`` and is
frozen after, before the network memorises the noisy labels (whose losses then fall too).
By default the estimate is the *largest* fit so far: memorisation only ever lowers the
high-loss share, and once a method trusts a too-small estimate its network memorises more,
which lowers the next fit further (measured on digits: Co-teaching's fits at 40% symmetric
noise went 0.27, 0.35, 0.27, then 0.03 from the fourth epoch on; RESULTS.md).

It is the state the methods hold (``forget_rate="estimate"``, ``flag_fraction="estimate"``),
trainer-free except for :meth:`refresh`, which finds the ``TrainingDynamics`` callback. Every
DDP rank holds the same store (it is all-gathered), and the fit is deterministic float64 on
the CPU, so every rank gets the same estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lightning_noise._validate import check_choice, check_int
from lightning_noise.dynamics.callback import TrainingDynamics
from lightning_noise.dynamics.store import DynamicsStore
from lightning_noise.functional.noise_rate import ESTIMATE_RULES
from lightning_noise.types import find_callback

__all__ = [
    "ESTIMATE",
    "KEEP_RULES",
    "MAX_ESTIMATED_RATE",
    "NOISE_RATE_KEY",
    "NoiseRateEstimate",
    "default_estimate_until",
    "estimated_forget_rate",
    "needs_dynamics_message",
]

#: The value of ``forget_rate`` / ``flag_fraction`` that asks for the estimate.
ESTIMATE = "estimate"

#: The name the estimate is logged under (each epoch, once it exists).
NOISE_RATE_KEY = "noise_rate/estimate"

#: What :class:`NoiseRateEstimate` keeps of its fits: the largest so far, or the latest.
KEEP_RULES = ("max", "last")

#: A forget rate must stay below 1: an estimate is used up to this value.
MAX_ESTIMATED_RATE = 0.99


def estimated_forget_rate(value: float | None) -> float:
    """The forget rate an estimate gives: 0 before it exists, at most ``MAX_ESTIMATED_RATE``."""
    return 0.0 if value is None else min(float(value), MAX_ESTIMATED_RATE)


def default_estimate_until(num_gradual: int, schedule_offset: int = 0) -> int:
    """The last epoch whose losses the forget-rate estimate is fitted on, by default.

    Co-teaching's schedule reaches its top at training epoch ``num_gradual - 1 -
    schedule_offset``, which uses the estimate fitted on the previous epoch's losses: the
    estimate follows the run through the ramp and is frozen where the ramp ends
    (``max(num_gradual - 2 - schedule_offset, 0)``).

    Example:
        >>> default_estimate_until(10), default_estimate_until(10, 1), default_estimate_until(1)
        (8, 7, 0)
    """
    return max(int(num_gradual) - 2 - int(schedule_offset), 0)


def needs_dynamics_message(who: str) -> str:
    """The error for a method asked to estimate the noise rate without ``TrainingDynamics``."""
    return (
        f"{who} estimates the noise rate from the per-sample losses that TrainingDynamics "
        "records, but the Trainer has no TrainingDynamics callback; add it: "
        "`Trainer(callbacks=[TrainingDynamics(), ...])` (YAML: `trainer.callbacks: "
        "[{class_path: lightning_noise.dynamics.TrainingDynamics}, ...]`), or give the rate "
        "as a number"
    )


class NoiseRateEstimate:
    """The training set's noise rate, estimated from the run's own per-sample losses.

    Call :meth:`refresh` at the start of every training epoch ``e``: while ``e - 1 <=
    until`` it refits on the losses recorded in epoch ``e - 1`` (the store holds each
    sample's latest loss, so these are exactly the previous epoch's) and keeps the largest
    fit so far (``keep="max"``) or the latest (``keep="last"``); after ``until`` it keeps
    the value.
    Before the first fit (epoch 0) :attr:`value` is ``None``. A refit happens once per epoch
    (:attr:`fitted_epoch`), so resuming from a checkpoint taken in the middle of an epoch
    keeps the estimate that epoch started with.

    Args:
        until: the last epoch (0-based) whose losses are fitted, >= 0; the estimate used from
            epoch ``until + 1`` on is frozen.
        rule: ``"posterior"`` (the fraction of samples whose posterior of the high-loss
            component exceeds 1/2) or ``"mean"`` (the mean posterior).
        keep: ``"max"`` (default: the largest fit so far, see the module docstring) or
            ``"last"`` (the latest fit).

    Example:
        >>> from lightning_noise.types import SampleBatch
        >>> store = DynamicsStore(100)
        >>> loss = torch.cat([torch.full((70,), 0.1), torch.full((30,), 2.0)])
        >>> index, target, logits = torch.arange(100), torch.zeros(100).long(), torch.zeros(100, 2)
        >>> store.update(SampleBatch.create(index, target, logits, loss), epoch=0)
        >>> estimate = NoiseRateEstimate(until=3)
        >>> estimate.refresh_from(store, epoch=1), estimate.fitted_epoch
        (0.3, 0)
    """

    def __init__(self, *, until: int, rule: str = "posterior", keep: str = "max") -> None:
        self.until = check_int("until", until, minimum=0)
        self.rule = check_choice("rule", rule, ESTIMATE_RULES)
        self.keep = check_choice("keep", keep, KEEP_RULES)
        #: The estimated noise rate, ``None`` before the first fit.
        self.value: float | None = None
        #: The last epoch whose losses were fitted (-1: none yet).
        self.fitted_epoch = -1
        #: The latest fit (equal to :attr:`value` under ``keep="last"``).
        self.last_fit: float | None = None

    def refresh_from(self, store: DynamicsStore, epoch: int) -> float | None:
        """At the start of training epoch ``epoch``: refit on epoch ``epoch - 1``'s losses if
        that epoch is at most ``until`` and was not fitted yet; return :attr:`value`."""
        source = epoch - 1
        if 0 <= source <= self.until and source > self.fitted_epoch:
            losses = store.losses_of_epoch(source)
            if int(torch.isfinite(losses).sum()) >= 2:
                fit = store.estimate_noise_rate(source, rule=self.rule)
                self.last_fit = fit
                keep_max = self.keep == "max" and self.value is not None
                self.value = max(self.value, fit) if keep_max else fit
                self.fitted_epoch = source
        return self.value

    def refresh(self, trainer: Any, *, who: str) -> float | None:
        """:meth:`refresh_from` with the store of the trainer's ``TrainingDynamics`` callback,
        at ``trainer.current_epoch``; ``who`` names the caller in the error when it is missing.
        """
        dynamics = find_callback(trainer, TrainingDynamics)
        if dynamics is None:
            raise RuntimeError(needs_dynamics_message(who))
        return self.refresh_from(dynamics.store, int(trainer.current_epoch))

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": math.nan if self.value is None else float(self.value),
            "last_fit": math.nan if self.last_fit is None else float(self.last_fit),
            "fitted_epoch": int(self.fitted_epoch),
            "keep": self.keep,
            "until": self.until,
            "rule": self.rule,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value = float(state.get("value", math.nan))
        self.value = None if math.isnan(value) else value
        last_fit = float(state.get("last_fit", value))
        self.last_fit = None if math.isnan(last_fit) else last_fit
        self.fitted_epoch = int(state.get("fitted_epoch", -1))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(until={self.until}, rule={self.rule!r}, keep={self.keep!r}, "
            f"value={self.value}, fitted_epoch={self.fitted_epoch})"
        )
