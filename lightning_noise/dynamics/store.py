"""Per-sample training dynamics, indexed by dataset position (DESIGN.md, ``dynamics/``).

The one store that noisy-label methods read: Late Stopping's first-time k-epoch learning
(Yuan et al., ICCV 2023, "Late Stopping: Avoiding Confidently Learning from Mislabeled
Examples"), small-loss selection (``last_loss``), and label audits by the area under the
margin (Pleiss et al., NeurIPS 2020, "Identifying Mislabeled Data using the Area Under the
Margin Ranking") and forgetting events (Toneva et al., ICLR 2019, "An Empirical Study of
Example Forgetting during Deep Neural Network Learning").

It depends on torch only; the ``TrainingDynamics`` callback feeds it from a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_noise._validate import check_int
from lightning_noise.functional.noise_rate import estimate_noise_rate
from lightning_noise.types import SampleBatch, as_long_tensor

__all__ = ["DynamicsStore"]

_NOT_SEEN = -1
_STATE_VERSION = 1


class DynamicsStore:
    """Per-sample correctness history, last loss and margin statistics, on the CPU.

    Each :meth:`update` records, for every sample index of a batch and the given epoch:
    whether the arg-max prediction equals the given (possibly noisy) label, the per-sample
    loss, and the AUM margin (assigned logit minus the largest other logit). The queries
    derive what the methods need:

    * :meth:`first_learned_epoch` -- first-time k-epoch learning (FkL) of Late Stopping
      (Yuan et al. 2023): the start of the first run of ``k`` consecutive correct observed
      epochs. Mislabeled examples reach it later than clean ones.
    * :attr:`last_loss` -- the small-loss criterion of sample selection (Co-teaching, ...).
    * :meth:`aum` -- the area under the margin (Pleiss et al. 2020): the mean margin over all
      recorded updates; mislabeled examples have low or negative AUM.
    * :meth:`forgetting_events` -- correct-to-wrong transitions (Toneva et al. 2019).

    "Observed epochs" are the epochs in which a sample was recorded at least once; epochs in
    which it was not seen (e.g. removed from the training set) are skipped, not counted as
    wrong. A sample recorded twice in one epoch keeps its last correctness and loss in the
    history, while the AUM averages every update.

    Memory: the history is an ``int8`` matrix of N x E bytes (N samples, E epoch capacity:
    :meth:`reserve_epochs`, which the callback calls with ``trainer.max_epochs``, or doubling
    when full), so 1M samples x 200 epochs take 200 MB, plus 20 bytes per
    sample for the per-sample vectors (float32 last loss, int32 last epoch, float64 margin sum,
    int32 update count), about 20 MB for 1M samples. :meth:`state_dict` holds the same amount.

    Args:
        num_samples: Number of samples N (the size of the full training set). Grow it later
            with :meth:`resize`.
        initial_epochs: Initial epoch capacity of the history; it doubles when exceeded.

    Example:
        >>> store = DynamicsStore(3)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
        >>> batch = SampleBatch.create(
        ...     torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), logits, torch.zeros(3)
        ... )
        >>> store.update(batch, epoch=0)
        >>> store.history.squeeze(1).tolist()
        [1, 1, 0]
        >>> store.aum().tolist()
        [2.0, 1.0, -3.0]
        >>> store.first_learned_epoch(1).tolist()
        [0, 0, -1]
    """

    def __init__(self, num_samples: int = 0, *, initial_epochs: int = 8) -> None:
        check_int("num_samples", num_samples, minimum=0)
        self._initial_epochs = check_int("initial_epochs", initial_epochs, minimum=1)
        self._num_epochs = 0
        self._allocate(num_samples, initial_epochs)

    def _allocate(self, num_samples: int, epoch_capacity: int) -> None:
        n = num_samples
        # Stored epoch-major ([E, N]): each epoch is a contiguous row, so recording a batch
        # scatters into one row and the per-epoch scans of the queries read contiguous memory.
        self._epochs = torch.full((epoch_capacity, n), _NOT_SEEN, dtype=torch.int8)
        self._last_loss = torch.full((n,), math.nan, dtype=torch.float32)
        self._last_epoch = torch.full((n,), _NOT_SEEN, dtype=torch.int32)
        self._margin_sum = torch.zeros(n, dtype=torch.float64)
        self._update_count = torch.zeros(n, dtype=torch.int32)

    # ------------------------------------------------------------------ size
    @property
    def num_samples(self) -> int:
        """Number of samples N that the store indexes."""
        return int(self._epochs.shape[1])

    @property
    def num_epochs(self) -> int:
        """One plus the highest epoch recorded, 0 when nothing was recorded."""
        return self._num_epochs

    @property
    def epoch_capacity(self) -> int:
        """Number of epoch columns allocated (>= :attr:`num_epochs`)."""
        return int(self._epochs.shape[0])

    def resize(self, num_samples: int) -> None:
        """Grow the store to ``num_samples`` samples; new samples start unseen.

        Raises:
            ValueError: when ``num_samples`` is smaller than the current size. The store never
                drops recorded samples; indices refer to the full training set, so a training
                subset does not need a smaller store.
        """
        check_int("num_samples", num_samples, minimum=0)
        n_old = self.num_samples
        if num_samples < n_old:
            raise ValueError(
                f"DynamicsStore cannot shrink from {n_old} to {num_samples} samples: indices are "
                "positions in the full training set, so keep the store at its size"
            )
        if num_samples == n_old:
            return
        old = (
            self._epochs.T,
            self._last_loss,
            self._last_epoch,
            self._margin_sum,
            self._update_count,
        )
        self._allocate(num_samples, self.epoch_capacity)
        new = (
            self._epochs.T,
            self._last_loss,
            self._last_epoch,
            self._margin_sum,
            self._update_count,
        )
        for dst, src in zip(new, old, strict=True):
            dst[:n_old] = src

    def reserve_epochs(self, num_epochs: int) -> None:
        """Set the history's capacity to ``num_epochs`` epochs (never below those recorded).

        With the run's length known (the callback passes ``trainer.max_epochs``) the history
        is exactly N x ``num_epochs`` bytes, instead of up to twice that after doubling.
        """
        check_int("num_epochs", num_epochs, minimum=1)
        self._set_epoch_capacity(max(num_epochs, self._num_epochs))

    def _set_epoch_capacity(self, new_capacity: int) -> None:
        if new_capacity == self.epoch_capacity:
            return
        keep = min(new_capacity, self.epoch_capacity)
        epochs = torch.full((new_capacity, self.num_samples), _NOT_SEEN, dtype=torch.int8)
        epochs[:keep] = self._epochs[:keep]
        self._epochs = epochs

    def _ensure_epoch(self, epoch: int) -> None:
        if epoch < self.epoch_capacity:
            return
        # Doubling keeps the total copying cost linear in the number of epochs.
        self._set_epoch_capacity(max(2 * self.epoch_capacity, epoch + 1))

    # ---------------------------------------------------------------- update
    def update(self, batch: SampleBatch, epoch: int) -> None:
        """Record one batch observed in ``epoch``.

        Args:
            batch: The batch; its ``index`` holds positions in the full training set.
            epoch: The epoch (>= 0) in which the batch was seen.

        Raises:
            ValueError: for a negative epoch or an index outside ``[0, num_samples)``.
        """
        self.record(batch.index, batch.correct, batch.loss, batch.margin, epoch)

    def record(
        self, index: Tensor, correct: Tensor, loss: Tensor, margin: Tensor, epoch: int
    ) -> None:
        """Record per-sample statistics already reduced from the logits.

        :meth:`update` calls this with ``batch.correct`` and ``batch.margin``; the
        ``TrainingDynamics`` callback calls it with these ``[B]`` vectors gathered from all
        ranks, which costs four numbers per sample instead of a row of logits.

        Args:
            index: ``[B]`` integer sample indices.
            correct: ``[B]`` bool (or 0/1) whether the prediction equals the given label.
            loss: ``[B]`` per-sample loss.
            margin: ``[B]`` AUM margin (assigned logit minus the largest other logit).
            epoch: The epoch (>= 0) in which the samples were seen.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        index = as_long_tensor(index.detach(), name="index").cpu()
        size = index.shape[0]
        correct = correct.detach().reshape(-1).cpu()
        loss = loss.detach().reshape(-1).cpu()
        margin = margin.detach().reshape(-1).cpu()
        for name, value in (("correct", correct), ("loss", loss), ("margin", margin)):
            if value.shape[0] != size:
                raise ValueError(
                    f"{name} must have shape [{size}] like index, got {tuple(value.shape)}"
                )
        if size == 0:
            return
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= self.num_samples:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"sample index {bad} is outside [0, {self.num_samples}) of this DynamicsStore: "
                "indices must be positions in the full training set; call "
                "`store.resize(len(full_training_set))` or pass the right num_samples"
            )
        self._ensure_epoch(epoch)

        # Every update counts towards the AUM, duplicates included (index_add_ accumulates).
        self._margin_sum.index_add_(0, index, margin.to(torch.float64))
        self._update_count.index_add_(0, index, torch.ones(size, dtype=torch.int32))

        # For the "last" fields the last occurrence of a duplicated index wins. Indexed
        # assignment with repeated indices is unordered in PyTorch, so keep only the last
        # occurrence: a stable sort groups equal indices in batch order.
        sorted_index, order = torch.sort(index, stable=True)
        is_last = torch.ones(size, dtype=torch.bool)
        is_last[:-1] = sorted_index[1:] != sorted_index[:-1]
        keep = order[is_last]
        rows = index[keep]
        self._epochs[epoch, rows] = correct[keep].to(torch.int8)
        self._last_loss[rows] = loss[keep].to(torch.float32)
        self._last_epoch[rows] = epoch
        self._num_epochs = max(self._num_epochs, epoch + 1)

    # --------------------------------------------------------------- queries
    @property
    def history(self) -> Tensor:
        """``[N, num_epochs]`` int8: 1 correct, 0 wrong, -1 not seen that epoch.

        A view of the internal buffer: read it, do not modify it (``.clone()`` to keep it).
        """
        return self._epochs[: self._num_epochs].T

    def correct_at(self, epoch: int) -> Tensor:
        """``[N]`` int8 column of :attr:`history` for ``epoch`` (all -1 if none recorded)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch >= self._num_epochs:
            return torch.full((self.num_samples,), _NOT_SEEN, dtype=torch.int8)
        return self._epochs[epoch].clone()

    @property
    def last_loss(self) -> Tensor:
        """``[N]`` float32 loss at the last update of each sample, NaN if never seen."""
        return self._last_loss.clone()

    def losses_of_epoch(self, epoch: int) -> Tensor:
        """``[N]`` float32 losses recorded in ``epoch``, NaN for samples not last seen then.

        The store keeps each sample's *last* loss only, so this is complete for the latest
        recorded epoch (every sample seen in it); for an earlier epoch it holds only the
        samples not seen since.
        """
        check_int("epoch", epoch, minimum=0)
        return torch.where(
            self._last_epoch == epoch, self._last_loss, torch.full_like(self._last_loss, math.nan)
        )

    def estimate_noise_rate(self, epoch: int | None = None, *, rule: str = "posterior") -> float:
        """The noise rate estimated from the losses of ``epoch`` (default: the latest).

        A two-component Gaussian mixture on the per-sample losses (DivideMix, Li et al., ICLR
        2020; :func:`~lightning_noise.functional.noise_rate.estimate_noise_rate`): the fraction
        of samples more likely in the high-loss component. Meaningful early in training,
        before the noisy labels are memorised.

        Raises:
            ValueError: when fewer than two samples were recorded in ``epoch``.
        """
        if epoch is None:
            epoch = max(self._num_epochs - 1, 0)
        return estimate_noise_rate(self.losses_of_epoch(epoch), rule=rule)

    @property
    def last_epoch(self) -> Tensor:
        """``[N]`` int64 epoch of the last update of each sample, -1 if never seen."""
        return self._last_epoch.long()

    @property
    def update_count(self) -> Tensor:
        """``[N]`` int64 number of updates of each sample (the AUM denominator)."""
        return self._update_count.long()

    @property
    def seen(self) -> Tensor:
        """``[N]`` bool: whether each sample was recorded at least once."""
        return self._update_count > 0

    def aum(self) -> Tensor:
        """``[N]`` float64 area under the margin (Pleiss et al. 2020), NaN if never seen.

        The mean over all recorded updates of the assigned logit minus the largest other
        logit. Low or negative values flag likely mislabeled samples.
        """
        count = self._update_count.to(torch.float64)
        out = self._margin_sum / count
        return torch.where(self._update_count > 0, out, torch.full_like(out, math.nan))

    def forgetting_events(self) -> Tensor:
        """``[N]`` int64 number of forgetting events (Toneva et al. 2019).

        A forgetting event is a transition from correct to wrong between two consecutive
        *observed* epochs of a sample (unseen epochs are skipped).
        """
        n = self.num_samples
        events = torch.zeros(n, dtype=torch.int64)
        previous = torch.full((n,), _NOT_SEEN, dtype=torch.int8)
        for epoch in range(self._num_epochs):
            column = self._epochs[epoch]
            events += ((previous == 1) & (column == 0)).long()
            previous = torch.where(column >= 0, column, previous)
        return events

    def first_learned_epoch(self, k: int, *, since: int = 0) -> Tensor:
        """``[N]`` int64 first-time k-epoch learning epoch (FkL, Yuan et al. 2023), -1 if never.

        The first epoch ``e`` such that the sample was correct (predicted as its given label)
        in ``k`` consecutive observed epochs starting at ``e``: the start of its first run of
        ``k`` consecutive correct observations. Epochs in which the sample was not seen are
        skipped; a wrong observation breaks the run.

        Args:
            k: Run length, >= 1. ``k=1`` is the first epoch the sample was correct.
            since: Ignore observations before this epoch (Late Stopping's official code
                counts only epochs after a warm-up).
        """
        check_int("k", k, minimum=1)
        check_int("since", since, minimum=0)
        n = self.num_samples
        # One vectorised pass over the epochs, tracking each sample's current run of correct
        # observations; unseen epochs (-1) leave the run untouched.
        result = torch.full((n,), -1, dtype=torch.int32)
        run_length = torch.zeros(n, dtype=torch.int32)
        run_start = torch.zeros(n, dtype=torch.int32)
        for epoch in range(since, self._num_epochs):
            column = self._epochs[epoch]
            correct = column == 1
            run_start.masked_fill_(correct & (run_length == 0), epoch)
            run_length.add_(correct)
            run_length.masked_fill_(column == 0, 0)
            newly = (run_length >= k) & (result < 0)
            result = torch.where(newly, run_start, result)
        return result.long()

    def learned_mask(self, k: int, *, since: int = 0) -> Tensor:
        """``[N]`` bool: whether each sample has reached first-time k-epoch learning."""
        return self.first_learned_epoch(k, since=since) >= 0

    def ever_learned(self) -> Tensor:
        """``[N]`` bool: whether each sample was correct in at least one recorded epoch."""
        return (self.history == 1).any(dim=1)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only, loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": _STATE_VERSION,
            "num_samples": self.num_samples,
            "num_epochs": self._num_epochs,
            "history": self.history.clone(memory_format=torch.contiguous_format),
            "last_loss": self._last_loss.clone(),
            "last_epoch": self._last_epoch.clone(),
            "margin_sum": self._margin_sum.clone(),
            "update_count": self._update_count.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore exactly the state saved by :meth:`state_dict`."""
        n = check_int("num_samples", state_dict["num_samples"], minimum=0)
        num_epochs = check_int("num_epochs", state_dict["num_epochs"], minimum=0)
        history = state_dict["history"]
        if tuple(history.shape) != (n, num_epochs):
            raise ValueError(
                f"history has shape {tuple(history.shape)}, expected ({n}, {num_epochs})"
            )
        vectors = {
            name: state_dict[name]
            for name in ("last_loss", "last_epoch", "margin_sum", "update_count")
        }
        for name, value in vectors.items():
            if tuple(value.shape) != (n,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({n},)")
        self._allocate(n, max(num_epochs, self._initial_epochs))
        self._epochs[:num_epochs] = history.T
        self._last_loss.copy_(vectors["last_loss"])
        self._last_epoch.copy_(vectors["last_epoch"])
        self._margin_sum.copy_(vectors["margin_sum"])
        self._update_count.copy_(vectors["update_count"])
        self._num_epochs = num_epochs

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(num_samples={self.num_samples}, num_epochs={self.num_epochs})"
