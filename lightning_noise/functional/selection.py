"""Small-loss selection, trainer-free: Co-teaching's schedule and masks, Adaptive-k's threshold.

Deep networks fit clean labels before noisy ones, so early in training a sample with a small
loss is likely clean. This module holds the algorithms on tensors (torch only), used by
``SmallLossSelection``, ``AdaptiveK`` (:mod:`lightning_noise.callbacks`) and
``CoTeachingMixin`` (:mod:`lightning_noise.mixins`) alike:

* Co-teaching (Han et al., NeurIPS 2018; official code ``bhanML/Co-teaching``): the forget-rate
  schedule :func:`coteaching_forget_rate`, :func:`num_kept` and one :func:`small_loss_mask`,
  and the cross selection of two networks, :func:`coteaching_selection` (with Co-teaching+'s
  disagreement set, Yu et al., ICML 2019).
* Adaptive-k (Dedeoglu, Kesgin, Amasyali, arXiv:2203.14165): :func:`adaptive_k_update`,
  :func:`adaptive_k_threshold` and the state :class:`AdaptiveKState`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_noise._validate import check_number, is_int, is_real

__all__ = [
    "OFFICIAL_PLUS_AGREEMENT_STEPS",
    "AdaptiveKState",
    "adaptive_k_threshold",
    "adaptive_k_update",
    "check_schedule",
    "check_schedule_offset",
    "coteaching_forget_rate",
    "coteaching_plus_official_disagreement",
    "coteaching_plus_official_update_gate",
    "coteaching_selection",
    "num_kept",
    "small_loss_mask",
]


def check_schedule(forget_rate: Any, num_gradual: Any, exponent: Any) -> None:
    if not is_real(forget_rate) or not 0.0 <= forget_rate < 1.0:
        raise ValueError(
            f"forget_rate must be a number in [0, 1) (Co-teaching sets it to the noise rate, "
            f"e.g. 0.2 or 0.45), got {forget_rate!r}"
        )
    if not is_int(num_gradual) or num_gradual < 1:
        raise ValueError(
            f"num_gradual must be an integer >= 1 (Co-teaching uses 5, 10 or 15), "
            f"got {num_gradual!r}"
        )
    if not is_real(exponent) or exponent <= 0:
        raise ValueError(
            f"exponent must be a finite number > 0 (Co-teaching uses 0.5, 1 or 2), got {exponent!r}"
        )


def check_schedule_offset(schedule_offset: Any) -> int:
    if not is_int(schedule_offset) or schedule_offset < 0:
        raise ValueError(
            f"schedule_offset must be an integer >= 0 (0: the paper's Algorithm 1, epoch 0 "
            f"keeps every sample; 1: the official training loop), got {schedule_offset!r}"
        )
    return int(schedule_offset)


def coteaching_forget_rate(
    epoch: int,
    *,
    forget_rate: float,
    num_gradual: int = 10,
    exponent: float = 1.0,
    schedule_offset: int = 0,
) -> float:
    """Co-teaching's forget rate ``R(T)`` at 0-based ``epoch``: the official code's schedule.

    The official ``bhanML/Co-teaching`` ``main.py`` builds::

        rate_schedule = np.ones(n_epoch) * forget_rate
        rate_schedule[:num_gradual] = np.linspace(0, forget_rate ** exponent, num_gradual)

    and this function returns ``rate_schedule[epoch + schedule_offset]`` (bit for bit, for any
    ``n_epoch``): a
    linear ramp from 0 at epoch 0 to ``forget_rate ** exponent`` at epoch ``num_gradual - 1``,
    then ``forget_rate`` from epoch ``num_gradual`` on.

    Two details of the official code are kept on purpose and differ from the paper's
    ``R(T) = min(T / T_k * tau, tau)`` (Algorithm 1 writes the *remember* rate ``1 - R``):

    * ``linspace`` includes its endpoint, so the ramp reaches its top at epoch
      ``num_gradual - 1`` (step ``tau / (T_k - 1)``), not at ``num_gradual``.
    * ``exponent`` (the paper's ``c``) raises ``forget_rate``, not the time: the ramp is linear
      up to ``tau ** c`` and then jumps to ``tau`` (up for ``c > 1``, down for ``c < 1``).

    The epoch count (``schedule_offset``): the official training loops (Co-teaching's and
    Co-teaching+'s ``main.py``) run ``for epoch in range(1, n_epoch)``; their epoch 0 only
    evaluates the random initialisation, so their first training epoch already forgets
    ``rate_schedule[1] = tau / (T_k - 1)``. ``epoch`` here is Lightning's 0-based
    ``trainer.current_epoch``. With ``schedule_offset=0`` (the default) the first training
    epoch uses ``rate_schedule[0] = 0`` and keeps every sample, as the paper's Algorithm 1
    (which updates ``R(T)`` at the end of epoch ``T``): the whole schedule is one epoch later
    than the official run's. ``schedule_offset=1`` counts epochs as the official loop does,
    so training epoch ``e`` forgets exactly what the official run's ``e``-th training epoch
    forgets.

    Args:
        epoch: 0-based epoch, >= 0.
        forget_rate: ``tau``, the final fraction of each mini-batch to drop, in ``[0, 1)``.
        num_gradual: ``T_k``, the number of ramp epochs, >= 1.
        exponent: ``c``, > 0.
        schedule_offset: added to ``epoch`` before the schedule is read: 0 (the paper's
            Algorithm 1, the default) or 1 (the official training loop), >= 0.

    Returns:
        The fraction of each mini-batch to drop at ``epoch``.

    Example:
        >>> [round(coteaching_forget_rate(e, forget_rate=0.4, num_gradual=5), 2) for e in range(6)]
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4]
        >>> rates = [coteaching_forget_rate(e, forget_rate=0.4, num_gradual=5, schedule_offset=1)
        ...          for e in range(5)]
        >>> [round(r, 2) for r in rates]
        [0.1, 0.2, 0.3, 0.4, 0.4]
    """
    check_schedule(forget_rate, num_gradual, exponent)
    check_schedule_offset(schedule_offset)
    if not is_int(epoch) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    epoch = epoch + schedule_offset
    if epoch >= num_gradual:
        return float(forget_rate)
    if num_gradual == 1:  # np.linspace(0, x, 1) == [0.0]
        return 0.0
    stop = float(forget_rate) ** float(exponent)
    if epoch == num_gradual - 1:  # np.linspace writes the endpoint exactly
        return stop
    # np.linspace computes arange(num) * (stop - start) / (num - 1) + start in float64.
    return float(epoch) * (stop / (num_gradual - 1)) + 0.0


def num_kept(batch_size: int, forget_rate: float) -> int:
    """How many samples of a mini-batch of ``batch_size`` survive ``forget_rate``.

    ``int((1 - forget_rate) * batch_size)`` as in the official Co-teaching ``loss.py``
    (truncation, not rounding), but at least 1 for a non-empty batch: the official code would
    divide by zero there (a loss of NaN), which happens only for tiny per-device batches
    (e.g. ``batch_size=1`` with any positive forget rate).

    Example:
        >>> num_kept(128, 0.2), num_kept(10, 0.45), num_kept(1, 0.5), num_kept(0, 0.5)
        (102, 5, 1, 0)
    """
    if not is_int(batch_size) or batch_size < 0:
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    if not is_real(forget_rate) or not 0.0 <= forget_rate < 1.0:
        raise ValueError(f"forget_rate must be a number in [0, 1), got {forget_rate!r}")
    if batch_size == 0:
        return 0
    return max(1, int((1.0 - forget_rate) * batch_size))


def small_loss_mask(loss: Tensor, k: int, *, candidates: Tensor | None = None) -> Tensor:
    """``[B]`` bool mask of the ``k`` smallest entries of the ``[B]`` per-sample ``loss``.

    With ``candidates`` (a ``[B]`` bool mask) only those entries compete, and ``k`` is at most
    their number (Co-teaching+ selects within the disagreement set). Ties are broken by
    position (a stable ascending sort: the earlier sample wins), so the mask is deterministic
    on every device. NaN losses sort last, so they are dropped first. (The official
    Co-teaching code uses ``np.argsort``, whose default quicksort does not fix the order of
    ties.)

    Example:
        >>> small_loss_mask(torch.tensor([0.3, 0.1, 0.3, 0.2]), 3).tolist()
        [True, True, False, True]
        >>> small_loss_mask(torch.tensor([0.3, 0.1, 0.3, 0.2]), 1,
        ...                 candidates=torch.tensor([True, False, True, False])).tolist()
        [True, False, False, False]
    """
    if loss.dim() != 1:
        raise ValueError(f"loss must be 1-D (one loss per sample), got {tuple(loss.shape)}")
    mask = torch.zeros(loss.shape[0], dtype=torch.bool, device=loss.device)
    if candidates is None:
        positions = torch.arange(loss.shape[0], device=loss.device)
    else:
        if candidates.shape != loss.shape:
            raise ValueError(
                f"candidates must be a [B] bool mask like loss, got {tuple(candidates.shape)}"
            )
        positions = candidates.bool().nonzero().squeeze(1)
    if not is_int(k) or not 0 <= k <= positions.numel():
        raise ValueError(f"k must be an integer in [0, {positions.numel()}], got {k!r}")
    order = torch.sort(loss.detach()[positions], stable=True).indices
    mask[positions[order[:k]]] = True
    return mask


def coteaching_selection(
    loss1: Tensor,
    loss2: Tensor,
    forget_rate: float,
    *,
    disagree: Tensor | None = None,
    keep_all_when_none_kept: bool = False,
) -> tuple[Tensor, Tensor]:
    """Which samples update each network: ``(keep_for_net1, keep_for_net2)``.

    Network 1 is updated on the small-loss samples of network 2, and vice versa (Han et al.
    2018, Algorithm 1): each network keeps ``num_kept(n, forget_rate)`` of its ``n``
    candidates with :func:`small_loss_mask`. With ``disagree`` (Co-teaching+, Yu et al. 2019)
    the candidates are the samples where the networks' predictions differ; when they agree on
    the whole batch, both networks are updated on every sample.

    Args:
        loss1: ``[B]`` per-sample losses of network 1.
        loss2: ``[B]`` per-sample losses of network 2.
        forget_rate: fraction dropped, in [0, 1).
        disagree: optional ``[B]`` bool mask of disagreement.
        keep_all_when_none_kept: when ``int((1 - forget_rate) * n)`` is 0, keep all ``n``
            candidates, as the official Co-teaching+ ``loss_coteaching`` does (default: keep
            one, :func:`num_kept`).

    Example:
        >>> loss1, loss2 = torch.tensor([0.1, 0.9]), torch.tensor([0.8, 0.2])
        >>> keep1, keep2 = coteaching_selection(loss1, loss2, 0.5)
        >>> keep1.tolist(), keep2.tolist()
        ([False, True], [True, False])
    """
    if loss1.shape != loss2.shape or loss1.dim() != 1:
        raise ValueError(
            f"loss1 and loss2 must be per-sample [B] losses of one shape, got "
            f"{tuple(loss1.shape)} and {tuple(loss2.shape)}"
        )
    # Plain Co-teaching selects from the whole batch, whose size the host knows: no sync.
    # Co-teaching+ selects from the disagreements, whose number it must read (one sync).
    candidates: Tensor | None = None
    n = loss1.shape[0]
    if disagree is not None:
        if not bool(disagree.any()):
            everyone = torch.ones_like(loss1, dtype=torch.bool)
            return everyone, everyone.clone()
        candidates = disagree.bool()
        n = int(candidates.sum())
    k = num_kept(n, forget_rate)
    if keep_all_when_none_kept and int((1.0 - forget_rate) * n) == 0:
        k = n
    picked_by_1 = small_loss_mask(loss1, k, candidates=candidates)
    picked_by_2 = small_loss_mask(loss2, k, candidates=candidates)
    return picked_by_2, picked_by_1


#: Co-teaching+'s official code trains on a batch the two networks fully agree on only while
#: ``epoch * i < 5000`` (``i`` the batch's position in the epoch): its ``step < 5000`` gate.
OFFICIAL_PLUS_AGREEMENT_STEPS = 5000


def coteaching_plus_official_disagreement(disagree: Tensor, index: Tensor) -> Tensor:
    """Co-teaching+'s disagreement set as the official ``loss_coteaching_plus`` forms it.

    The official code (``xingruiyu/coteaching_plus``, ``loss.py``) collects the dataset
    indices of the disagreeing samples as ``ind * mask`` and keeps the non-zero entries, which
    also drops the sample whose dataset index is 0. It then truncates its list of batch
    positions to that length (``disagree_id[:ind_disagree.shape[0]]``). So when the sample of
    dataset index 0 is among the disagreements, the *last* disagreeing position of the batch
    leaves the set (index 0 itself stays unless it is the last). Computed on the device.

    Args:
        disagree: ``[B]`` bool, where the networks' arg-max predictions differ.
        index: ``[B]`` dataset indices of the batch.

    Example:
        >>> d = torch.tensor([True, False, True, True])
        >>> coteaching_plus_official_disagreement(d, torch.tensor([5, 0, 0, 7])).tolist()
        [True, False, True, False]
        >>> coteaching_plus_official_disagreement(d, torch.tensor([5, 1, 2, 7])).tolist()
        [True, False, True, True]
    """
    if disagree.dim() != 1 or index.shape != disagree.shape:
        raise ValueError(
            f"disagree and index must be [B] tensors of one shape, got "
            f"{tuple(disagree.shape)} and {tuple(index.shape)}"
        )
    disagree = disagree.bool()
    positions = torch.arange(disagree.shape[0], device=disagree.device)
    has_zero = (disagree & (index == 0)).any()
    last = torch.where(disagree, positions, -1).max() if disagree.numel() else positions.sum()
    return disagree & ~(has_zero & (positions == last))


def coteaching_plus_official_update_gate(
    epoch: int, batch_idx: int, limit: int = OFFICIAL_PLUS_AGREEMENT_STEPS
) -> float:
    """1.0 while ``epoch * batch_idx < limit``, else 0.0: the official code's weight of a batch
    on which the two networks agree everywhere (``update_step``; ``epoch`` counted as the
    official loop counts it, from 1).

    Example:
        >>> gate = coteaching_plus_official_update_gate
        >>> gate(25, 199), gate(26, 199)  # 4975 and 5174 steps
        (1.0, 0.0)
    """
    if not is_int(epoch) or epoch < 0 or not is_int(batch_idx) or batch_idx < 0:
        raise ValueError(
            f"epoch and batch_idx must be integers >= 0, got {epoch!r} and {batch_idx!r}"
        )
    return 1.0 if epoch * batch_idx < limit else 0.0


def adaptive_k_update(
    m: float, v: float, batch_mean: float, *, beta1: float = 0.9, beta2: float = 0.999
) -> tuple[float, float]:
    """One Adaptive-k moving-average step: ``m <- b1 m + (1-b1) mu``, ``v <- b2 v + (1-b2) mu^2``.

    ``mu`` is the mini-batch mean loss. As in the official notebook there is **no** bias
    correction. Computed in float64 (Python floats), as the notebook's NumPy code.

    Example:
        >>> m, v = adaptive_k_update(0.0, 0.0, 2.0)
        >>> round(m, 6), round(v, 6)
        (0.2, 0.004)
    """
    m = beta1 * m + (1.0 - beta1) * batch_mean
    v = beta2 * v + (1.0 - beta2) * batch_mean * batch_mean
    return m, v


def adaptive_k_threshold(m: Any, v: Any, eps: float = 1e-8) -> Any:
    """The Adaptive-k threshold ``m / (sqrt(v) + eps)`` (official notebook, no bias correction).

    ``m`` and ``v`` are Python floats or tensors (then the result is a tensor on their device,
    computed without reading it on the host).

    Example:
        >>> round(adaptive_k_threshold(*adaptive_k_update(0.0, 0.0, 2.0)), 4)  # 0.1 / sqrt(0.001)
        3.1623
    """
    root = v.sqrt() if isinstance(v, Tensor) else math.sqrt(v)
    return m / (root + eps)


class AdaptiveKState:
    """Adaptive-k's threshold state: the moving averages ``m``, ``v`` and the update count.

    Fed Python floats it computes in Python floats (float64). Fed a 0-d tensor (a batch mean
    still on the GPU), ``m``, ``v`` and ``steps`` become tensors on that device and nothing is
    read on the host: a training step does not wait for the GPU (DESIGN.md 8).
    :meth:`state_dict` reads them back as numbers.

    Example:
        >>> state = AdaptiveKState()
        >>> round(state.update(2.0), 4), state.steps
        (3.1623, 1)
        >>> state = AdaptiveKState()
        >>> t = state.update(torch.tensor(2.0, dtype=torch.float64), valid=torch.tensor(True))
        >>> round(float(t), 4), int(state.steps)
        (3.1623, 1)
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.beta1 = check_number("beta1", beta1, low=0, high=1, high_open=True)
        self.beta2 = check_number("beta2", beta2, low=0, high=1, high_open=True)
        self.eps = check_number("eps", eps, low=0, low_open=True)
        #: Moving average of the batch mean loss (float64; a tensor once fed tensors).
        self.m: float | Tensor = 0.0
        #: Moving average of the squared batch mean loss (float64; a tensor once fed tensors).
        self.v: float | Tensor = 0.0
        #: Number of moving-average updates (a tensor once fed tensors).
        self.steps: int | Tensor = 0

    @property
    def threshold(self) -> float | Tensor:
        """The current threshold ``m / (sqrt(v) + eps)`` (0 before the first update)."""
        return adaptive_k_threshold(self.m, self.v, self.eps)

    def update(self, batch_mean: float | Tensor, valid: Tensor | None = None) -> float | Tensor:
        """Fold one batch mean loss into ``m`` and ``v``; return the new threshold.

        ``valid`` (a 0-d bool tensor, with a tensor ``batch_mean``): where it is False the
        state is left as it was (a batch without samples, or a non-finite mean), decided on
        the device.
        """
        m, v = adaptive_k_update(self.m, self.v, batch_mean, beta1=self.beta1, beta2=self.beta2)
        if valid is None:
            self.m, self.v = m, v
            self.steps = self.steps + 1
        else:
            self.m = torch.where(valid, m, torch.as_tensor(self.m, dtype=m.dtype, device=m.device))
            self.v = torch.where(valid, v, torch.as_tensor(self.v, dtype=v.dtype, device=v.device))
            self.steps = valid.to(torch.int64) + self.steps
        return self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {"m": float(self.m), "v": float(self.v), "steps": int(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = float(state.get("m", 0.0))
        self.v = float(state.get("v", 0.0))
        self.steps = int(state.get("steps", 0))
