"""Late Stopping: shrink the training set round by round to the examples learned first.

Yuan, Feng and Liu, "Late Stopping: Avoiding Confidently Learning from Mislabeled Examples",
ICCV 2023 (arXiv:2308.13862; official code ``tmllab/2023_ICCV_LateStopping``).

Mislabeled examples reach *first-time k-epoch learning* (FkL: predicted as their given label
in k consecutive epochs) later than clean ones, even hard clean ones. Late Stopping trains in
rounds. In round ``r`` (1-based) a freshly initialised model trains on the current set; after
each epoch past a warm-up, the examples that have reached FkL are counted, and as soon as
their number reaches ``N_0 * prod(rate of rounds 1..r)`` (``N_0`` the full training set) the
round ends and exactly those examples form the next round's set. Rounds 1-4 use ``k = 1``,
5-8 ``k = 2`` and 9-12 ``k = 3``. A final run trains a fresh model on the last set.

The trainer-free core is :mod:`lightning_noise.functional.late_stopping`: ``round_schedule``
(the k and the target of every round) and ``fkl_selection`` (learned mask -> next set);
:class:`LateStopping` drives the rounds inside one ``Trainer.fit``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_noise._compat import can_reload_train_dataloader, reload_train_dataloader
from lightning_noise._validate import check_int
from lightning_noise.data.restrict import restrict_loader
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.dynamics.reports import full_training_set, known_noise_info
from lightning_noise.functional._sharding import full_cpu_copy, placed_like
from lightning_noise.functional.late_stopping import (
    RoundPlan,
    check_rates,
    check_rounds,
    fkl_selection,
    round_schedule,
)
from lightning_noise.metrics import noise_detection_scores
from lightning_noise.types import find_callback

__all__ = ["LateStopping", "RoundPlan", "fkl_selection", "round_schedule"]

#: A callable from parameters to an optimizer (LightningCLI builds it from ``class_path``).
OptimizerCallable = Callable[[Iterable[Any]], torch.optim.Optimizer]
#: A callable from an optimizer to an LR scheduler.
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class LateStopping(Callback):
    """Late Stopping (Yuan et al., ICCV 2023) in one ``Trainer.fit``: the callback runs the rounds.

    Each epoch past the round's warm-up, the callback reads first-time k-epoch learning from
    the :class:`~lightning_noise.dynamics.TrainingDynamics` store (which must be among the
    trainer's callbacks) over the current training set. When the number of FkL examples
    reaches the round's target (:func:`round_schedule`) the round ends, and before the next
    epoch the callback:

    1. makes those examples the training set and has the trainer reload its training loader,
       so removed samples are never loaded again, on any rank: a DataModule (or
       LightningModule) with ``set_train_indices(indices)`` (as
       :class:`~lightning_noise.data.NoisyLabelDataModule`) builds its next loader itself;
       for any other, the DataLoader its ``train_dataloader`` returns is rebuilt over the kept
       samples (:func:`~lightning_noise.data.restrict.restrict_loader`: same batch size,
       shuffling, workers and collate function);
    2. re-initialises the model to the weights it had when fit started (the official code
       builds a fresh random model each round; a snapshot makes rounds reproducible and
       resumable whatever builds the model; it is checkpointed with the callback);
    3. re-creates the optimizers and LR schedulers from ``configure_optimizers`` (fresh
       state; a scheduler restarts with the round). :attr:`in_final_run` tells
       ``configure_optimizers`` which run it configures; or give ``final_optimizer`` (and
       ``final_scheduler``) and the final run uses those instead of the module's.

    After the last selection round, a final run trains the re-initialised model on the kept
    set for ``final_epochs`` epochs, then the callback stops training. Give the Trainer
    enough epochs (``max_epochs=-1`` leaves it to the callback); it warns at setup when
    ``max_epochs`` is below the least the schedule needs, and at the end of fit when training
    ended before the final run did.

    **Logged** every epoch (``late_stopping/...``): ``round`` (1-based, rounds + 1 in the
    final run), ``k``, ``learned`` (FkL examples of the round so far), ``target`` and
    ``kept`` (the current set's size). At each round's end, when the training set knows its
    noise mask: ``removed_precision``, ``removed_recall`` and ``removed_f1`` of all removed
    samples taken as the noisy ones (clean labels are read for this report only).
    :attr:`rounds` keeps one record per finished round; :attr:`detection` the latest
    precision/recall/F1.

    **Predictions.** FkL is read from the predictions of the training steps that
    ``TrainingDynamics`` records (train mode, on the training augmentation, as the model
    stood at each batch). The official code instead predicts the current set in eval mode
    after each epoch (also with the training augmentation); that costs one more forward
    pass over the set per epoch. The official code also counts epochs only up to the
    previous one, which ends each round one epoch later than counting the epoch just
    trained, as here.

    **DDP.** The store is identical on every rank (all-gathered), so every rank takes the
    same decision, keeps the same set and re-initialises to the same weights; the training
    loader is rebuilt on every rank. Single-device and DDP strategies are supported.

    Args:
        rate: Fraction of the *full* training set kept per round: one number, or one per k
            stage. The paper's scripts: 0.98 at 20% noise, 0.955 at 40% (CIFAR-10), 0.975 at
            40% (CIFAR-100). About ``(1 - noise rate) ** (1 / rounds)`` keeps as many
            samples as are clean.
        rounds_per_k: Rounds with k = 1, k = 2, ... (official: 4, 4, 4).
        warmup_epochs: Epochs at the start of each round that FkL does not count (official:
            epochs 0-6, ``WARM_UP_EPOCHS = 6`` with ``epoch > 6``, so 7).
        final_epochs: Epochs of the final run on the kept set (official: 300).
        max_round_epochs: A selection round that has not reached its target after this
            many epochs ends without removing anything (with a warning), as the official
            code's rounds do after ``EPOCH = 300`` epochs.
        final_optimizer: The optimizer of the final run, a callable from the parameters to
            an optimizer (in YAML a ``class_path`` with ``init_args``). ``None``: the module's
            ``configure_optimizers`` (which may read :attr:`in_final_run`). The official
            scripts train the selection rounds with SGD lr 0.01 and no schedule and the final
            run with SGD lr 0.02 (momentum 0.9, weight decay 5e-4).
        final_scheduler: The final run's LR scheduler, a callable from the optimizer, stepped
            once per epoch from the final run's first epoch (official:
            ``MultiStepLR(milestones=[10, 20, 40, 60, 80], gamma=0.5)``). Needs
            ``final_optimizer``; ``None``: a constant LR.

    Example:
        >>> late = LateStopping(rate=0.955, rounds_per_k=(4, 4, 4), warmup_epochs=7)
        >>> trainer = pl.Trainer(callbacks=[TrainingDynamics(), late], max_epochs=-1, logger=False)
        >>> late.num_rounds, late.in_final_run
        (12, False)
    """

    def __init__(
        self,
        rate: float | Sequence[float] = 0.955,
        rounds_per_k: Sequence[int] = (4, 4, 4),
        warmup_epochs: int = 7,
        final_epochs: int = 300,
        max_round_epochs: int = 300,
        final_optimizer: OptimizerCallable | None = None,
        final_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if final_scheduler is not None and final_optimizer is None:
            raise ValueError(
                "final_scheduler needs final_optimizer (the optimizer it schedules); give "
                "final_optimizer too, e.g. {class_path: torch.optim.SGD, init_args: {lr: 0.02}}"
            )
        for name, value in (
            ("final_optimizer", final_optimizer),
            ("final_scheduler", final_scheduler),
        ):
            if value is not None and not callable(value):
                raise ValueError(
                    f"{name} must be a callable (an optimizer/scheduler class, a "
                    f"functools.partial of one, or a class_path in YAML), got {value!r}"
                )
        self.final_optimizer = final_optimizer
        self.final_scheduler = final_scheduler
        self.rounds_per_k = check_rounds(rounds_per_k)
        self.rate = check_rates(rate, len(self.rounds_per_k))
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, minimum=0)
        self.final_epochs = check_int("final_epochs", final_epochs, minimum=1)
        self.max_round_epochs = check_int("max_round_epochs", max_round_epochs, minimum=1)
        self.num_rounds = sum(self.rounds_per_k)
        self._reset_state()

    def _reset_state(self) -> None:
        self.round_index = 0  # 0-based selection round; num_rounds is the final run
        self.round_start_epoch = 0
        self.kept: Tensor | None = None  # None: the full training set
        self.num_samples: int | None = None  # N_0
        self.finished = False
        self.rounds: list[dict[str, float]] = []
        self.detection: dict[str, float] | None = None
        self._initial_state: dict[str, Tensor] | None = None
        self._source: Any = None
        self._original_loader: Any = None
        self._module: Any = None  # whose configure_optimizers is wrapped (final_optimizer)

    @property
    def state_key(self) -> str:
        return "LateStopping"

    @property
    def in_final_run(self) -> bool:
        """Whether the selection rounds are over and the final run trains."""
        return self.round_index >= self.num_rounds

    def min_epochs_needed(self) -> int:
        """The fewest epochs the schedule can take: warm-up + k per round, plus the final run."""
        k_of_round = [stage + 1 for stage, n in enumerate(self.rounds_per_k) for _ in range(n)]
        return sum(self.warmup_epochs + k for k in k_of_round) + self.final_epochs

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _find_source(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The DataModule (else the LightningModule) that provides ``train_dataloader``."""
        for source in (getattr(trainer, "datamodule", None), pl_module):
            if source is None:
                continue
            if callable(getattr(source, "set_train_indices", None)):
                return source
            if is_overridden("train_dataloader", source):
                return source
        raise ValueError(
            "LateStopping shrinks the training set between rounds, so it must rebuild the "
            "training loader; a loader passed as trainer.fit(train_dataloaders=...) cannot be "
            "rebuilt. Pass a DataModule (`trainer.fit(model, datamodule=dm)`) or define "
            "`train_dataloader` on the LightningModule; a DataModule with "
            "`set_train_indices(indices)` builds the smaller loader itself. See "
            "docs/methods/late_stopping.md"
        )

    def _restrict(self, source: Any) -> None:
        """Make ``source`` load only the kept samples from now on.

        With ``set_train_indices`` (this library's DataModules) the source rebuilds its loader
        itself; otherwise its ``train_dataloader`` is wrapped (on this instance only, undone
        at the end of fit) so that the loader it returns is rebuilt over the kept samples
        (:func:`~lightning_noise.data.restrict.restrict_loader`).
        """
        if callable(getattr(source, "set_train_indices", None)):
            source.set_train_indices(self.kept)
            return
        if self._original_loader is None:
            original = source.train_dataloader
            self._original_loader = original

            def train_dataloader() -> Any:
                return restrict_loader(original(), self.kept)

            source.train_dataloader = train_dataloader

    def _unrestrict(self) -> None:
        if self._original_loader is not None and self._source is not None:
            del self._source.train_dataloader  # back to the class's method
        self._original_loader = None
        if self._module is not None:
            del self._module.configure_optimizers  # back to the class's method
            self._module = None

    def configure_final_run(self, parameters: Iterable[Any]) -> Any:
        """The final run's optimizer (and scheduler, stepped every epoch), in the form
        ``configure_optimizers`` returns, from ``final_optimizer`` / ``final_scheduler``."""
        if self.final_optimizer is None:
            raise ValueError("configure_final_run needs final_optimizer")
        optimizer = self.final_optimizer(parameters)
        if self.final_scheduler is None:
            return optimizer
        scheduler = self.final_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def _use_final_optimizer(self, pl_module: pl.LightningModule) -> None:
        """Have ``pl_module.configure_optimizers`` return the final run's optimizer once the
        selection rounds are over (on this instance only, undone at the end of fit).

        Lightning calls it when fit starts (after a resume, after this callback's state is
        restored, so a run resumed in the final run gets the final optimizer and loads its
        saved state) and :meth:`_restart` calls it at each round switch.
        """
        if self.final_optimizer is None or self._module is not None:
            return
        original = pl_module.configure_optimizers

        def configure_optimizers() -> Any:
            if self.in_final_run:
                return self.configure_final_run(pl_module.parameters())
            return original()

        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
        self._module = pl_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        find_callback(trainer, TrainingDynamics, needed_by="LateStopping")
        self._source = self._find_source(trainer, pl_module)
        self._use_final_optimizer(pl_module)
        if not can_reload_train_dataloader(trainer):
            raise RuntimeError(  # pragma: no cover - guards a Lightning-internal change
                "LateStopping cannot make this Lightning version reload its training loader; "
                "please report it with your Lightning version"
            )
        if getattr(pl_module, "automatic_optimization", True) is False:
            rank_zero_warn(
                "LateStopping re-creates the optimizers from configure_optimizers each round; "
                "with manual optimization make sure your training_step uses self.optimizers() "
                "rather than a reference kept from an earlier round"
            )
        max_epochs = trainer.max_epochs
        needed = self.min_epochs_needed()
        if max_epochs is not None and 0 <= max_epochs < needed:
            rank_zero_warn(
                f"LateStopping needs at least {needed} epochs ({self.num_rounds} rounds of "
                f"{self.warmup_epochs} warm-up + k epochs, then {self.final_epochs} final "
                f"epochs) but max_epochs={max_epochs}: training will end before the final run "
                "unless you resume with more; set max_epochs=-1 to let LateStopping stop it"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the checkpoint has restored the state: keep its snapshot and set.
        if self._initial_state is None:
            # A module's extra state (e.g. ELRLoss's per-sample targets) is not a tensor.
            # Under FSDP2 the weights are gathered to full tensors (every rank takes part), so
            # a checkpoint, which keeps rank zero's copy, holds the whole snapshot.
            self._initial_state = {
                key: full_cpu_copy(value) if isinstance(value, Tensor) else copy.deepcopy(value)
                for key, value in pl_module.state_dict().items()
            }
        # Before the fit loop requests its first training loader.
        self._restrict(self._source)

    # ------------------------------------------------------------------ rounds
    def plan(self, num_samples: int) -> list[RoundPlan]:
        """:func:`round_schedule` of this callback for ``num_samples`` training samples."""
        return round_schedule(num_samples, self.rate, self.rounds_per_k)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished:
            return
        epoch = trainer.current_epoch
        epochs_in_round = epoch + 1 - self.round_start_epoch
        if self.in_final_run:
            self._log(pl_module, k=0, learned=-1, target=-1)
            if epochs_in_round >= self.final_epochs:
                self.finished = True
                trainer.should_stop = True
                rank_zero_info(
                    f"LateStopping: the final run trained {epochs_in_round} epochs on "
                    f"{self._kept_count()} samples; stopping"
                )
            return

        store = find_callback(trainer, TrainingDynamics, needed_by=type(self).__name__).store
        if self.num_samples is None:
            self.num_samples = store.num_samples
        plan = self.plan(self.num_samples)[self.round_index]
        current = self._current_set()
        since = self.round_start_epoch + self.warmup_epochs
        learned = (
            fkl_selection(store.learned_mask(plan.k, since=since), current)
            if epoch >= since
            else current[:0]
        )
        self._log(pl_module, k=plan.k, learned=learned.numel(), target=plan.target)
        if learned.numel() >= plan.target:
            self._end_round(trainer, pl_module, learned, plan, epochs_in_round, reached=True)
        elif epochs_in_round >= self.max_round_epochs:
            rank_zero_warn(
                f"LateStopping: round {plan.round} reached only {learned.numel()} of its "
                f"{plan.target} FkL examples in max_round_epochs={self.max_round_epochs} "
                "epochs; it ends without removing anything (as the official code does). "
                "A higher rate or more epochs per round avoid this"
            )
            self._end_round(trainer, pl_module, current, plan, epochs_in_round, reached=False)

    def _current_set(self) -> Tensor:
        assert self.num_samples is not None
        return torch.arange(self.num_samples) if self.kept is None else self.kept

    def _kept_count(self) -> int:
        if self.kept is None:
            return self.num_samples or 0
        return int(self.kept.numel())

    def _log(self, pl_module: pl.LightningModule, *, k: int, learned: int, target: int) -> None:
        values = {
            "round": float(self.round_index + 1),
            "kept": float(self._kept_count()),
        }
        if not self.in_final_run:
            values.update(k=float(k), learned=float(learned), target=float(target))
        for key, value in values.items():
            # Identical on every rank (the store is all-gathered): the sync only averages
            # equal numbers, and keeps Lightning from warning about unsynced epoch logs.
            pl_module.log(
                f"late_stopping/{key}", value, on_step=False, on_epoch=True, sync_dist=True
            )

    def _end_round(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        next_set: Tensor,
        plan: RoundPlan,
        epochs: int,
        *,
        reached: bool,
    ) -> None:
        record: dict[str, float] = {
            **{key: float(value) for key, value in asdict(plan).items()},
            "epochs": float(epochs),
            "reached_target": float(reached),
            "kept": float(next_set.numel()),
        }
        assert self.num_samples is not None
        mask, _ = known_noise_info(trainer, full_training_set(trainer), self.num_samples)
        if mask is not None:
            removed = torch.ones(self.num_samples, dtype=torch.bool)
            removed[next_set] = False
            scores = noise_detection_scores(removed, mask)
            self.detection = {key: float(value) for key, value in scores.items()}
            record.update({f"removed_{key}": value for key, value in self.detection.items()})
            for key in ("precision", "recall", "f1"):
                pl_module.log(
                    f"late_stopping/removed_{key}",
                    self.detection[key],
                    on_step=False,
                    on_epoch=True,
                    sync_dist=True,
                )
        self.rounds.append(record)
        rank_zero_info(
            f"LateStopping: round {plan.round} (k={plan.k}) ended after {epochs} epochs; "
            f"keeping {next_set.numel()} of {self.num_samples} samples"
            + (
                f" (removed as noisy: precision {self.detection['precision']:.3f}, "
                f"recall {self.detection['recall']:.3f})"
                if mask is not None and self.detection is not None
                else ""
            )
        )
        self.round_index += 1
        self.round_start_epoch = trainer.current_epoch + 1
        self.kept = next_set.clone()
        self._restart(trainer, pl_module)

    def _restart(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fresh weights, fresh optimizers and a training loader over the kept set."""
        assert self._initial_state is not None
        # Under FSDP2 each rank loads its own block of the full snapshot.
        current = pl_module.state_dict()
        pl_module.load_state_dict(
            {
                key: placed_like(value, current[key])
                if isinstance(value, Tensor) and key in current
                else value
                for key, value in self._initial_state.items()
            }
        )
        trainer.strategy.setup_optimizers(trainer)
        self._restrict(self._source)
        # The fit loop requests a new loader at the next epoch start. A sampler that shrinks
        # in place would not do: Lightning may wrap it with a fixed length.
        reload_train_dataloader(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: Any) -> None:
        self._unrestrict()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unrestrict()
        if not self.finished:
            where = (
                f"in the final run ({trainer.current_epoch - self.round_start_epoch} of "
                f"{self.final_epochs} epochs)"
                if self.in_final_run
                else f"in selection round {self.round_index + 1} of {self.num_rounds}"
            )
            rank_zero_warn(
                f"LateStopping: training ended {where}, so the model is not the final Late "
                "Stopping model; resume from the last checkpoint with a higher max_epochs "
                "(or use max_epochs=-1)"
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "round_index": self.round_index,
            "round_start_epoch": self.round_start_epoch,
            "kept": None if self.kept is None else self.kept.clone(),
            "num_samples": self.num_samples,
            "finished": self.finished,
            "rounds": [dict(r) for r in self.rounds],
            "detection": None if self.detection is None else dict(self.detection),
            "initial_state": self._initial_state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.round_index = int(state_dict["round_index"])
        self.round_start_epoch = int(state_dict["round_start_epoch"])
        kept = state_dict["kept"]
        self.kept = None if kept is None else torch.as_tensor(kept).long().cpu()
        self.num_samples = state_dict["num_samples"]
        self.finished = bool(state_dict["finished"])
        self.rounds = [dict(r) for r in state_dict["rounds"]]
        detection = state_dict.get("detection")
        self.detection = None if detection is None else dict(detection)
        self._initial_state = state_dict["initial_state"]
        if self.round_index > self.num_rounds:
            raise ValueError(
                f"the checkpoint's LateStopping is in round {self.round_index + 1}, beyond "
                f"this callback's {self.num_rounds} rounds; resume with the same rounds_per_k"
            )
