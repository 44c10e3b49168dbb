"""``TrainingDynamics``: the callback that feeds a :class:`DynamicsStore` from a Trainer.

Late Stopping (Yuan et al., ICCV 2023), small-loss selection and label audits by AUM (Pleiss
et al., NeurIPS 2020) or forgetting events (Toneva et al., ICLR 2019) read its store.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noise._validate import check_int
from lightning_noise.dynamics.reports import (
    check_indexed_training_set,
    full_training_set,
    known_noise_info,
    unwrap_subset,
)
from lightning_noise.dynamics.store import DynamicsStore
from lightning_noise.types import SampleBatch

#: File written to the logger's folder at the end of training.
EXPORT_FILE = "dynamics.pt"

#: Samples whose statistics may wait on the device before they are recorded (besides every
#: epoch's end): 2**20 rows of 4 float64 numbers are 32 MiB.
PENDING_ROWS = 2**20

__all__ = ["TrainingDynamics"]


class TrainingDynamics(Callback):
    """Record per-sample training dynamics of every training batch into a ``DynamicsStore``.

    The ``training_step`` must return the dict of a per-sample module (keys ``"loss"``,
    ``"per_sample_loss"``, ``"logits"``, ``"target"``, ``"index"``; see
    ``PerSampleLossMixin``). At each ``on_train_batch_end`` the callback records each sample's
    correctness against its given label, loss and AUM margin at ``trainer.current_epoch``.
    Other callbacks find it with ``find_callback(trainer, TrainingDynamics)``
    (:func:`lightning_noise.types.find_callback`) and read :attr:`store`; place it before
    them in ``callbacks`` when they read it in ``on_train_batch_end``.

    The training samples must carry their index (:class:`~lightning_noise.data.Indexed`,
    checked before the first batch) and ``training_step`` must return the per-sample dict
    (checked at the first batch; ``PerSampleLossMixin.step_outputs`` builds it); each error
    shows the code to add.

    No host synchronisation per step: each batch's four numbers per sample stay on the device
    and are copied to the CPU and recorded at the epoch's end (or once ``PENDING_ROWS``
    samples wait), in one copy; reading :attr:`store` records them at once. So a bad sample
    index is reported at the epoch's end, not at its batch.

    Under DDP every rank all-gathers the per-sample statistics of all ranks, padded because
    the last batch may differ in size per rank, so every rank holds an identical store equal
    to that of one process seeing the same batches. Note that Lightning's
    ``DistributedSampler`` pads the epoch by repeating samples so that ranks get equal shares;
    such a sample is recorded twice in that epoch (the last wins in the history, both count in
    the AUM).

    Args:
        k: Run length of first-time k-epoch learning used by :meth:`first_learned_epoch`
            (Yuan et al. 2023), >= 1.
        num_samples: Size of the full training set. ``None`` reads it from the training
            dataloader's dataset (unwrapping ``Subset``), which must then have a length.

    Example:
        >>> from lightning_noise.types import find_callback
        >>> callback = TrainingDynamics(k=2)
        >>> trainer = pl.Trainer(callbacks=[callback], logger=False)
        >>> find_callback(trainer, TrainingDynamics) is callback
        True
    """

    def __init__(self, k: int = 3, *, num_samples: int | None = None) -> None:
        self.k = check_int("k", k, minimum=1)
        self.num_samples = check_int("num_samples", num_samples, minimum=0, optional=True)
        self._store = DynamicsStore(num_samples or 0)
        self._nonfinite = 0
        # Per-batch statistics still on the device: (stats [B, 4], epoch, global step).
        self._pending: list[tuple[Tensor, int, int]] = []
        self._pending_rows = 0

    @property
    def store(self) -> DynamicsStore:
        """The :class:`DynamicsStore`, with every batch recorded so far.

        The batches' statistics stay on the device until the epoch ends (or
        ``PENDING_ROWS`` samples wait), so training never waits for a copy to the CPU; reading
        this property records them first, which synchronises with the device once.
        """
        self._flush()
        return self._store

    @store.setter
    def store(self, store: DynamicsStore) -> None:
        self._pending, self._pending_rows = [], 0
        self._store = store

    @property
    def nonfinite_observations(self) -> int:
        """Sample observations dropped because their loss or logits were not finite."""
        self._flush()
        return self._nonfinite

    @nonfinite_observations.setter
    def nonfinite_observations(self, value: int) -> None:
        self._nonfinite = int(value)

    @property
    def state_key(self) -> str:
        # Stable across runs and hyperparameters, so a checkpoint resumes even when k changes.
        return "TrainingDynamics"

    # ------------------------------------------------------------- sizing
    def _size_store(self, trainer: pl.Trainer) -> None:
        if self.num_samples is not None:
            self._store.resize(max(self.num_samples, self._store.num_samples))
            return
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader):
            dataset = unwrap_subset(loader.dataset)
            size = len(dataset) if hasattr(dataset, "__len__") else None
        else:
            size = None
        if size is None:
            raise ValueError(
                "TrainingDynamics could not read the training set size from "
                f"trainer.train_dataloader ({type(loader).__name__}); it needs one DataLoader "
                "over a dataset with a length, or pass `TrainingDynamics(num_samples=...)`"
            )
        if size > self._store.num_samples:
            self._store.resize(size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_indexed_training_set(trainer, "TrainingDynamics")
        self._size_store(trainer)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and 0 < max_epochs <= 100_000:  # -1/None: unbounded
            self._store.reserve_epochs(max_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The dataloader may have been reloaded (reload_dataloaders_every_n_epochs).
        self._size_store(trainer)

    # ------------------------------------------------------------ recording
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        stats = None if outputs is None else self._batch_stats(SampleBatch.from_outputs(outputs))
        if trainer.world_size > 1:
            stats = self._all_gather(trainer, pl_module, stats)
        if stats is None or stats.shape[0] == 0:
            return  # the step was skipped (training_step returned None) on every rank
        # No copy to the CPU here (it would wait for the GPU every step): keep the batch's
        # statistics on the device and record them at the epoch's end, in one copy.
        self._pending.append((stats, trainer.current_epoch, trainer.global_step))
        self._pending_rows += stats.shape[0]
        if self._pending_rows >= PENDING_ROWS:
            self._flush()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()

    def _flush(self) -> None:
        """Record the pending batches in order, with one copy to the CPU for all of them."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        device = pending[0][0].device
        stats = torch.cat([s.to(device) for s, _, _ in pending]).cpu()
        for (_, epoch, step), part in zip(
            pending, stats.split([s.shape[0] for s, _, _ in pending]), strict=True
        ):
            self._record(part, epoch, step)

    def _record(self, stats: Tensor, epoch: int, step: int) -> None:
        index, correct, loss, margin = stats.unbind(dim=1)
        finite = torch.isfinite(loss) & torch.isfinite(margin)
        if not bool(finite.all()):  # CPU tensors: no device sync
            # A NaN/inf loss or logit is no statistic: such an observation is not recorded
            # (its prediction, an arg-max over NaN, would read as class 0), only counted.
            dropped = int((~finite).sum())
            if self._nonfinite == 0:
                rank_zero_warn(
                    f"TrainingDynamics: {dropped} samples had a non-finite loss or logits at "
                    f"global step {step}; they are not recorded (counted in "
                    "nonfinite_observations; this warning is shown once)"
                )
            self._nonfinite += dropped
            index, correct, loss, margin = (t[finite] for t in (index, correct, loss, margin))
        self._store.record(index.long(), correct.bool(), loss, margin, epoch)

    @staticmethod
    def _batch_stats(batch: SampleBatch) -> Tensor:
        """``[B, 4]`` float64 (index, correct, loss, margin) on the batch's device.

        Gathering these four numbers per sample, instead of the logits, keeps the collective
        small for many classes. float64 holds indices below 2**53 and float32 losses exactly.
        """
        return torch.stack(
            [
                batch.index.to(torch.float64),
                batch.correct.to(torch.float64),
                batch.loss.to(torch.float64),
                batch.margin.to(torch.float64),
            ],
            dim=1,
        )

    @staticmethod
    def _all_gather(
        trainer: pl.Trainer, pl_module: pl.LightningModule, stats: Tensor | None
    ) -> Tensor:
        """Concatenate ``stats`` of all ranks in rank order (padding uneven batch sizes)."""
        device = pl_module.device
        if stats is None:
            stats = torch.zeros(0, 4, dtype=torch.float64, device=device)
        stats = stats.to(device)
        # Collectives need one shape on every rank: gather the sizes, pad to the largest,
        # gather, then strip each rank's padding.
        sizes = trainer.strategy.all_gather(torch.tensor([stats.shape[0]], device=device))
        sizes = sizes.reshape(-1).tolist()
        padded = torch.zeros(max(sizes), 4, dtype=stats.dtype, device=device)
        padded[: stats.shape[0]] = stats
        gathered = trainer.strategy.all_gather(padded)  # [world_size, max_size, 4]
        return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])

    # ---------------------------------------------------------------- export
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write ``dynamics.pt`` to the logger's folder (what ``lightning-noise plot`` reads):
        the per-sample correctness history, last loss, first-learned epoch (``k``), AUM and,
        when the training set knows it, its noise mask (for the reports only)."""
        log_dir = trainer.log_dir if trainer.loggers else None  # every rank asks (broadcast)
        if log_dir is None or not trainer.is_global_zero or self.store.num_samples == 0:
            return
        try:
            mask, _ = known_noise_info(trainer, full_training_set(trainer), self.store.num_samples)
        except ValueError:
            mask = None
        export = {
            "k": self.k,
            "history": self.store.history,
            "last_loss": self.store.last_loss,
            "first_learned_epoch": self.store.first_learned_epoch(self.k),
            "aum": self.store.aum(),
            "noise_mask": mask,
        }
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        torch.save(export, Path(log_dir) / EXPORT_FILE)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "store": self.store.state_dict(),
            "nonfinite_observations": self.nonfinite_observations,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.k = int(state_dict.get("k", self.k))
        self._pending, self._pending_rows = [], 0
        self._store.load_state_dict(state_dict["store"])
        self.nonfinite_observations = int(state_dict.get("nonfinite_observations", 0))

    # --------------------------------------------------------- passthroughs
    def first_learned_epoch(self, k: int | None = None, *, since: int = 0) -> Tensor:
        """``[N]`` first-time k-epoch learning epoch, -1 if never (``k`` defaults to ``self.k``)."""
        return self.store.first_learned_epoch(self.k if k is None else k, since=since)

    def learned_mask(self, k: int | None = None, *, since: int = 0) -> Tensor:
        """``[N]`` bool: whether each sample reached first-time k-epoch learning."""
        return self.store.learned_mask(self.k if k is None else k, since=since)

    def aum(self) -> Tensor:
        """``[N]`` area under the margin (Pleiss et al. 2020), NaN if never seen."""
        return self.store.aum()

    def forgetting_events(self) -> Tensor:
        """``[N]`` number of forgetting events (Toneva et al. 2019)."""
        return self.store.forgetting_events()
