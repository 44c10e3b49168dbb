"""Label audit: rank training samples by how likely their label is wrong, at the end of fit.

The suspicion scores come from the per-sample training dynamics that
:class:`~lightning_noise.dynamics.TrainingDynamics` records:

* ``"aum"`` -- a low area under the margin (Pleiss et al., NeurIPS 2020, "Identifying
  Mislabeled Data using the Area Under the Margin Ranking"): mislabeled samples keep a
  low or negative margin of their given label over the strongest other class.
* ``"forgetting"`` -- many forgetting events (Toneva et al., ICLR 2019, "An Empirical Study
  of Example Forgetting during Deep Neural Network Learning"); samples never learned count
  as forgotten infinitely often, as in the paper.
* ``"loss"`` -- a high last loss (the small-loss criterion of Co-teaching, Han et al.,
  NeurIPS 2018, read the other way round).
* ``"first_learned"`` -- a late (or no) first-time k-epoch learning epoch (Late Stopping,
  Yuan et al., ICCV 2023, "Late Stopping: Avoiding Confidently Learning from Mislabeled
  Examples").

The trainer-free core is :func:`suspicion_scores` (store -> one score per sample) and
:func:`rank_samples` (scores -> order); :class:`LabelAudit` is the Lightning adapter that
also predicts labels, writes the report and measures detection against a known noise mask.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noise._validate import check_choice, check_int, check_number
from lightning_noise.dynamics import DynamicsStore, TrainingDynamics
from lightning_noise.dynamics.noise_rate import ESTIMATE, NOISE_RATE_KEY, NoiseRateEstimate
from lightning_noise.dynamics.reports import (
    NEEDS_INDEX,
    check_indexed_training_set,
    full_training_set,
    is_indexed_sample,
    known_noise_info,
)
from lightning_noise.metrics import noise_detection_scores
from lightning_noise.types import DictSampleModule, find_callback

__all__ = [
    "SCORES",
    "LabelAudit",
    "rank_samples",
    "raw_statistic",
    "suspicion_scores",
    "threshold_flags",
]

#: The suspicion scores :class:`LabelAudit` knows.
SCORES = ("aum", "forgetting", "loss", "first_learned")

#: Name of the raw statistic behind each score (a column of the report).
_STATISTIC = {
    "aum": "aum",
    "forgetting": "forgetting_events",
    "loss": "last_loss",
    "first_learned": "first_learned_epoch",
}

_DEFAULT_FLAG_FRACTION = 0.1
#: ``LabelAudit(flag_fraction="estimate")``: the last epoch whose losses are fitted, by default.
_DEFAULT_ESTIMATE_UNTIL = 2


def _check_score(score: Any) -> str:
    return check_choice("score", score, SCORES)


def raw_statistic(store: DynamicsStore, score: str, *, k: int = 3) -> Tensor:
    """``[N]`` float64 statistic behind ``score``, as the papers define it; NaN if never seen.

    ``"aum"``: the area under the margin; ``"forgetting"``: the number of forgetting events;
    ``"loss"``: the last recorded loss; ``"first_learned"``: the first-time ``k``-epoch
    learning epoch, -1 when never reached.
    """
    score = _check_score(score)
    if score == "aum":
        value = store.aum()
    elif score == "forgetting":
        value = store.forgetting_events().double()
    elif score == "loss":
        value = store.last_loss.double()
    else:
        value = store.first_learned_epoch(k).double()
    return torch.where(store.seen, value, torch.full_like(value, math.nan))


def suspicion_scores(store: DynamicsStore, score: str, *, k: int = 3) -> Tensor:
    """``[N]`` float64 suspicion of every sample's label: higher is more likely mislabeled.

    * ``"aum"``: minus the AUM (Pleiss et al. 2020).
    * ``"forgetting"``: the number of forgetting events (Toneva et al. 2019); ``inf`` for a
      sample that was seen but never predicted as its given label, which Toneva et al.
      count as forgotten infinitely often.
    * ``"loss"``: the last recorded per-sample loss.
    * ``"first_learned"``: the first-time ``k``-epoch learning epoch (Yuan et al. 2023);
      ``inf`` when the sample never reached it.

    Samples the store never saw get NaN (they have no score).

    Args:
        store: The training dynamics.
        score: One of :data:`SCORES`.
        k: Run length of first-time k-epoch learning (only for ``"first_learned"``).

    Example:
        >>> from lightning_noise.types import SampleBatch
        >>> store = DynamicsStore(3)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
        >>> target = torch.tensor([0, 1, 1])
        >>> store.update(SampleBatch.create(torch.arange(3), target, logits, torch.zeros(3)), 0)
        >>> suspicion_scores(store, "aum").tolist()
        [-2.0, -1.0, 3.0]
        >>> suspicion_scores(store, "first_learned", k=1).tolist()
        [0.0, 0.0, inf]
    """
    score = _check_score(score)
    value = raw_statistic(store, score, k=k)
    if score == "aum":
        return -value
    if score == "forgetting":
        never_learned = store.seen & ~store.ever_learned()
        return value.masked_fill(never_learned, math.inf)
    if score == "first_learned":
        return value.masked_fill(value < 0, math.inf)
    return value


def threshold_flags(
    aum: Tensor, threshold_mask: Tensor, percentile: float = 99.0
) -> tuple[Tensor, float]:
    """Flag the samples whose AUM is below the threshold samples' ``percentile``-th percentile.

    AUM with threshold samples (Pleiss et al. 2020): ``threshold_mask`` marks the samples
    trained on a fake class (:class:`~lightning_noise.data.ThresholdSamples`), whose AUMs show
    how a mislabeled sample scores. A real sample is flagged when more than
    ``(100 - percentile)``% of the threshold samples have a higher AUM: the official
    ``generate_aum_details`` rule (``AUM_WTR``), i.e. its AUM is below their 99th percentile.
    Threshold samples and samples never seen (NaN AUM) are not flagged.

    Args:
        aum: ``[N]`` areas under the margin, NaN where never seen.
        threshold_mask: ``[N]`` bool, the threshold samples.
        percentile: In ``(0, 100)``; the paper's is 99.

    Returns:
        ``([N] bool flags, the percentile of the threshold samples' AUMs)`` (the latter for
        reports; the flags use the counting rule above).

    Example:
        >>> aum = torch.tensor([3.0, -1.8, 0.5, -2.0, -1.5, -0.5])
        >>> mask = torch.tensor([False, False, False, True, True, True])
        >>> flags, cut = threshold_flags(aum, mask, percentile=50.0)
        >>> flags.tolist(), round(cut, 2)
        ([False, True, False, False, False, False], -1.5)
    """
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100) (the paper's is 99), got {percentile!r}")
    aum = aum.detach().double().cpu().reshape(-1)
    threshold_mask = threshold_mask.bool().cpu().reshape(-1)
    if threshold_mask.shape != aum.shape:
        raise ValueError(
            f"threshold_mask must be [N] like aum, got {tuple(threshold_mask.shape)} "
            f"and {tuple(aum.shape)}"
        )
    seen = ~torch.isnan(aum)
    reference = torch.sort(aum[threshold_mask & seen]).values
    if reference.numel() == 0:
        raise ValueError(
            "no threshold sample was seen in training, so there is no AUM threshold: the "
            "training set must carry threshold samples (threshold_samples=1 on the DataModule)"
        )
    # Number of threshold samples with a strictly higher AUM than each sample.
    higher = reference.numel() - torch.searchsorted(reference, aum.nan_to_num(), right=True)
    flags = (higher.double() / reference.numel() > 1.0 - percentile / 100.0) & seen
    flags &= ~threshold_mask
    return flags, float(torch.quantile(reference, percentile / 100.0))


def rank_samples(suspicion: Tensor, tie_break: Tensor | None = None) -> Tensor:
    """Indices of the scored samples, most suspicious first.

    Samples with a NaN suspicion (never seen) are left out. Ties, common for the integer
    scores (forgetting events, first-learned epochs), are broken by ``tie_break`` (higher
    first; the audit passes the last loss), then by index, so the order is deterministic.

    Args:
        suspicion: ``[N]`` scores, higher is more suspicious.
        tie_break: Optional ``[N]`` secondary key, higher first; NaN sorts last.

    Example:
        >>> rank_samples(torch.tensor([1.0, 3.0, float("nan"), 1.0]), torch.tensor([0, 0, 0, 5.0]))
        tensor([1, 3, 0])
    """
    suspicion = suspicion.detach().reshape(-1).cpu()
    index = torch.nonzero(~torch.isnan(suspicion)).reshape(-1)
    if tie_break is not None:
        secondary = tie_break.detach().reshape(-1).cpu().double()[index]
        secondary = torch.nan_to_num(secondary, nan=-math.inf)
        # Stable sorts from the least to the most significant key: a lexicographic order.
        index = index[torch.sort(secondary, descending=True, stable=True).indices]
    order = torch.sort(suspicion[index], descending=True, stable=True).indices
    return index[order]


class LabelAudit(Callback):
    """Rank the training samples by a suspicion score and report the likely mislabeled ones.

    At the end of fit (``on_train_end``) the callback reads the store of the
    :class:`~lightning_noise.dynamics.TrainingDynamics` callback (which must be among the
    trainer's callbacks), scores every sample with :func:`suspicion_scores` and ranks them
    with :func:`rank_samples` (ties broken by the last loss). It writes
    ``label_audit_<score>.csv`` to ``output_dir``, one row per sample, most suspicious first:

    ``rank, index, given_label, predicted_label, score, <statistic>, flagged`` and, when the
    training set has a known ``noise_mask``, ``is_noisy`` (and ``clean_label`` when it has
    ``clean_targets``). ``score`` is the suspicion (higher is more suspicious, e.g. minus the
    AUM); ``<statistic>`` the raw value (``aum``, ``forgetting_events``, ``last_loss`` or
    ``first_learned_epoch``, -1 for never); ``flagged`` marks the top ``flag_fraction``.

    **Predicted labels** come from one inference pass after training: the final model, in
    eval mode under ``torch.no_grad`` and the trainer's precision context, runs over the full
    training set behind ``trainer.train_dataloader`` (a ``Subset`` is unwrapped) with a plain
    ``DataLoader`` (no shuffle, the training loader's batch size, workers and collate
    function). Each batch's ``(input, target, index)`` gives the sample's index and its given
    label, so the report never depends on the order of the dataset. Under DDP and FSDP2 every
    rank runs the pass (a sharded forward needs all of them) and rank zero's labels are
    broadcast (other ranks' BatchNorm buffers may differ after the last step), so every rank
    ends with the same attributes. The pass sees the
    training set's own transform: with random augmentation the prediction is that of one
    augmented view. The module's ``forward`` must return logits; override
    :meth:`predict_logits` otherwise. Samples that are dicts with an ``"index"`` (a causal
    LM's prompt/response pairs) are predicted by the module's ``sample_logits(batch)``
    (:class:`~lightning_noise.types.DictSampleModule`): for ``CausalLMModule`` the given and
    predicted labels are token ids of each pair's first answer token. It costs one
    forward-only pass over the training set.

    **Detection.** When the training dataset (or the datamodule) has a ``noise_mask``, the
    callback measures how well the top ``flag_fraction`` of the ranking finds the noisy
    labels (precision, recall and F1, as :class:`~lightning_noise.metrics.NoiseDetection`
    defines them), stores them in :attr:`detection`, logs them to every logger of the
    trainer as ``label_audit/<score>/{precision,recall,f1}``, and plots histograms of the
    statistic for clean and noisy samples to ``label_audit_<score>.png`` (without a mask,
    one histogram of all samples). Clean labels are read for this report only, never by a
    method (DESIGN.md protocol 1).

    Every rank computes the same ranking (the dynamics store is identical on all ranks);
    rank zero writes the files.

    Args:
        score: One of ``"aum"``, ``"forgetting"``, ``"loss"`` or ``"first_learned"`` (the
            latter with the ``k`` of the ``TrainingDynamics`` callback).
        top_k: Write only the ``top_k`` most suspicious samples; ``None`` writes all.
        output_dir: Folder of the report; ``None`` is ``<trainer.log_dir>/label_audit``
            (``trainer.default_root_dir`` without a logger).
        flag_fraction: Fraction of the ranked samples flagged as mislabeled, in ``(0, 1]``;
            ``None`` uses the realised noise fraction when the noise mask is known (an
            oracle: the true noise rate), else 0.1. ``"estimate"`` estimates the noise rate
            from the run itself (no oracle): a two-component Gaussian mixture on the
            per-sample losses of an early epoch (DivideMix's mixture, Li et al. 2020;
            :class:`~lightning_noise.dynamics.noise_rate.NoiseRateEstimate`), refitted at each
            epoch's start on the previous epoch's losses up to those of epoch
            ``estimate_until``, then frozen; logged as ``noise_rate/estimate``.
        threshold: ``None`` flags the ``flag_fraction`` above. ``"auto"`` (``score="aum"``
            only) decides without any noise rate, as Pleiss et al. 2020 do: the training set
            carries threshold samples (``threshold_samples=1`` on the DataModule, the model
            one output more), and a sample is flagged when its AUM is below the
            ``threshold_percentile``-th percentile of the threshold samples' AUMs
            (:func:`threshold_flags`). One run, one set of threshold samples: they get no
            verdict in this run (their score is NaN and they are not ranked); a second run
            with ``threshold_samples=2`` judges them, as the official code's second run does.
        threshold_percentile: The percentile for ``threshold="auto"`` (paper: 99).
        estimate_until: With ``flag_fraction="estimate"``: the last epoch (0-based) whose
            losses are fitted (default 2: early, before plain training memorises the noisy
            labels; not tuned).

    Attributes set at the end of fit (on every rank): ``scores`` (``[N]`` suspicion, NaN if
    never seen), ``ranking`` (indices, most suspicious first), ``given_labels`` and
    ``predicted_labels`` (``[N]``, -1 where a sample was not predicted), ``flagged``
    (``[N]`` bool), ``detection`` (``{"precision", "recall", "f1", "flag_fraction"}`` floats,
    or ``None`` without a noise mask), ``csv_path`` and ``plot_path``; with
    ``threshold="auto"`` also ``aum_threshold`` (the percentile of the threshold samples'
    AUMs) and ``threshold_mask``.

    Example:
        >>> audit = LabelAudit(score="aum", top_k=100)
        >>> trainer = pl.Trainer(callbacks=[TrainingDynamics(), audit], logger=False)
        >>> audit.state_dict()["score"]
        'aum'
    """

    def __init__(
        self,
        score: str = "aum",
        top_k: int | None = None,
        output_dir: str | None = None,
        flag_fraction: float | str | None = None,
        threshold: str | None = None,
        threshold_percentile: float = 99.0,
        estimate_until: int | None = None,
    ) -> None:
        self.score = _check_score(score)
        self.threshold = check_choice("threshold", threshold, (None, "auto"))
        self.threshold_percentile = check_number(
            "threshold_percentile", threshold_percentile, low=0.0, high=100.0,
            low_open=True, high_open=True,
        )  # fmt: skip
        if self.threshold == "auto" and self.score != "aum":
            raise ValueError(
                f"threshold='auto' uses AUM's threshold samples, so it needs score='aum' "
                f"(got score={self.score!r})"
            )
        if self.threshold == "auto" and flag_fraction is not None:
            raise ValueError(
                "threshold='auto' decides how many samples to flag from the threshold samples; "
                "leave flag_fraction=None (or use threshold=None to flag a fixed fraction)"
            )
        self.top_k = check_int("top_k", top_k, minimum=1, optional=True)
        if output_dir is not None and not isinstance(output_dir, str | os.PathLike):
            raise ValueError(f"output_dir must be None or a path, got {output_dir!r}")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        #: The noise-rate estimate behind ``flag_fraction="estimate"`` (``None`` otherwise).
        self.estimate: NoiseRateEstimate | None = None
        if flag_fraction == ESTIMATE:
            until = check_int("estimate_until", estimate_until, minimum=0, optional=True)
            self.estimate = NoiseRateEstimate(
                until=_DEFAULT_ESTIMATE_UNTIL if until is None else until
            )
        elif estimate_until is not None:
            raise ValueError(
                f"estimate_until={estimate_until!r} is for flag_fraction='estimate'; with "
                f"flag_fraction={flag_fraction!r} leave it None"
            )
        if flag_fraction is not None and self.estimate is None:
            ok = isinstance(flag_fraction, int | float) and not isinstance(flag_fraction, bool)
            if not ok or not 0.0 < flag_fraction <= 1.0:
                raise ValueError(
                    f"flag_fraction must be None, 'estimate' or in (0, 1], got {flag_fraction!r}"
                )
            flag_fraction = float(flag_fraction)
        self.flag_fraction = flag_fraction
        self._reset_results()

    def _reset_results(self) -> None:
        self.scores: Tensor | None = None
        self.ranking: Tensor | None = None
        self.given_labels: Tensor | None = None
        self.predicted_labels: Tensor | None = None
        self.flagged: Tensor | None = None
        self.detection: dict[str, float] | None = None
        self.csv_path: str | None = None
        self.plot_path: str | None = None
        self.aum_threshold: float | None = None
        self.threshold_mask: Tensor | None = None

    @property
    def state_key(self) -> str:
        # Lightning refuses two stateful callbacks with one key: two audits may differ in any
        # hyperparameter (e.g. the same score written to two folders).
        return self._generate_state_key(
            score=self.score,
            top_k=self.top_k,
            output_dir=self.output_dir,
            flag_fraction=self.flag_fraction,
            # Only when set, so that the key of an audit without it stays what it was.
            **({"threshold": self.threshold} if self.threshold else {}),
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            find_callback(trainer, TrainingDynamics, needed_by="LabelAudit")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.estimate is None:
            return
        value = self.estimate.refresh(trainer, who="LabelAudit(flag_fraction='estimate')")
        if value is not None:
            pl_module.log(NOISE_RATE_KEY, value, on_step=False, on_epoch=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_indexed_training_set(trainer, "LabelAudit")
        dataset = full_training_set(trainer)
        if hasattr(dataset, "__len__") and len(dataset) and isinstance(dataset[0], Mapping):
            self._check_dict_samples(pl_module)
        if self.threshold == "auto" and self._threshold_mask(trainer) is None:
            raise ValueError(
                "LabelAudit(threshold='auto') needs AUM's threshold samples in the training "
                "set: pass threshold_samples=1 to the DataModule (the lightning-noise command "
                "then gives the model one more output), or wrap your indexed training set in "
                "lightning_noise.data.ThresholdSamples(dataset, num_classes) and build the "
                "model with num_classes + 1 outputs"
            )

    @staticmethod
    def _threshold_mask(trainer: pl.Trainer) -> Tensor | None:
        dataset = full_training_set(trainer)
        mask = getattr(dataset, "threshold_mask", None)
        if mask is None:
            mask = getattr(getattr(trainer, "datamodule", None), "threshold_mask", None)
        return None if mask is None else torch.as_tensor(mask).bool().cpu()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_results()
        dynamics = find_callback(trainer, TrainingDynamics, needed_by=type(self).__name__)
        if dynamics.nonfinite_observations:
            raise RuntimeError(
                f"LabelAudit will not write a report from this run: "
                f"{dynamics.nonfinite_observations} sample observations had a non-finite loss "
                "or logits, so the per-sample statistics describe a broken run. Find the cause "
                "(NaN/inf inputs, a diverging learning rate; NonFiniteGuard skips such steps and "
                "says when) and train again"
            )
        store = dynamics.store
        n = store.num_samples
        self.scores = suspicion_scores(store, self.score, k=dynamics.k)
        statistic = raw_statistic(store, self.score, k=dynamics.k)
        auto_flags = None
        if self.threshold == "auto":
            mask = self._threshold_mask(trainer)
            if mask is None or mask.numel() != n:
                raise ValueError(
                    f"LabelAudit(threshold='auto'): the training set's threshold_mask must be "
                    f"[{n}] like the TrainingDynamics store, got "
                    f"{None if mask is None else tuple(mask.shape)}"
                )
            auto_flags, self.aum_threshold = threshold_flags(
                statistic, mask, self.threshold_percentile
            )
            self.threshold_mask = mask
            # Threshold samples carry a fake label: they get no score and no rank.
            self.scores = self.scores.masked_fill(mask, math.nan)
        self.ranking = rank_samples(self.scores, tie_break=store.last_loss)
        dataset = full_training_set(trainer)
        self.given_labels, self.predicted_labels = self._predict(trainer, pl_module, dataset, n)
        noise_mask, clean_targets = known_noise_info(trainer, dataset, n)

        fraction = self.flag_fraction
        if self.estimate is not None:
            # The losses of the last epoch count too when it is within the window (a run
            # shorter than estimate_until + 2 epochs).
            fraction = self.estimate.refresh_from(store, int(trainer.current_epoch))
            if fraction is None:
                raise RuntimeError(
                    "LabelAudit(flag_fraction='estimate') found no epoch of losses to estimate "
                    "the noise rate from (did training run an epoch?)"
                )
            fraction = max(fraction, 1.0 / max(1, self.ranking.numel()))
        elif fraction is None:
            known = noise_mask is not None and self.ranking.numel() > 0
            fraction = (
                float(noise_mask[self.ranking].float().mean()) if known else _DEFAULT_FLAG_FRACTION
            )
        if auto_flags is not None:
            self.flagged = auto_flags
            num_flagged = int(auto_flags.sum())
        else:
            num_flagged = min(self.ranking.numel(), max(1, round(fraction * self.ranking.numel())))
            self.flagged = torch.zeros(n, dtype=torch.bool)
            self.flagged[self.ranking[:num_flagged]] = True
        if noise_mask is not None and self.ranking.numel() > 0:
            # Over the ranked (seen) samples only: the local functional form, because every
            # rank already holds all samples (a synced Metric would all-reduce for nothing).
            result = noise_detection_scores(self.flagged[self.ranking], noise_mask[self.ranking])
            self.detection = {key: float(value) for key, value in result.items()}
            self.detection["flag_fraction"] = num_flagged / self.ranking.numel()
        if self.ranking.numel() == 0:
            rank_zero_warn(
                "LabelAudit: the TrainingDynamics store recorded no sample, so the audit is "
                "empty (did training run any batch?)"
            )

        # trainer.log_dir broadcasts from rank zero: every rank must call it.
        root = self.output_dir
        if root is None:
            root = os.path.join(trainer.log_dir or trainer.default_root_dir, "label_audit")
        self.csv_path = os.path.join(root, f"label_audit_{self.score}.csv")
        self.plot_path = os.path.join(root, f"label_audit_{self.score}.png")
        if self.detection is not None or self.aum_threshold is not None:
            metrics = {
                f"label_audit/{self.score}/{key}": self.detection[key]
                for key in ("precision", "recall", "f1")
                if self.detection is not None
            }
            if self.aum_threshold is not None:
                metrics[f"label_audit/{self.score}/threshold"] = self.aum_threshold
                metrics[f"label_audit/{self.score}/flag_fraction"] = num_flagged / max(
                    1, self.ranking.numel()
                )
            for logger in trainer.loggers:  # loggers log on rank zero only
                logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            Path(root).mkdir(parents=True, exist_ok=True)
            self._write_csv(statistic, noise_mask, clean_targets)
            self._write_plot(statistic, noise_mask)
            for logger in trainer.loggers:  # W&B: the report as a table, the plot as an image
                if hasattr(logger, "log_csv_table"):
                    logger.log_csv_table(f"label_audit/{self.score}/report", self.csv_path)
                if hasattr(logger, "log_figure_file") and os.path.exists(self.plot_path):
                    logger.log_figure_file(f"label_audit/{self.score}/plot", self.plot_path)

    # ------------------------------------------------------------ predictions
    def predict_logits(self, pl_module: pl.LightningModule, inputs: Any) -> Tensor:
        """``[B, C]`` logits of one batch of training inputs (``pl_module(inputs)``).

        Override it for a module whose ``forward`` does not return logits.
        """
        return pl_module(inputs)

    @staticmethod
    def _check_dict_samples(pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, DictSampleModule):
            raise ValueError(
                f"LabelAudit: the training samples are dicts, and {type(pl_module).__name__} "
                "has no `sample_logits(batch) -> (target [B], logits [B, C])` to say which "
                "label and logits stand for each sample (lightning_noise.types."
                "DictSampleModule; CausalLMModule has it); give it one, or yield "
                "(input, target, index) samples"
            )

    def _predict(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Any, n: int
    ) -> tuple[Tensor, Tensor]:
        """``([N] given labels, [N] predicted labels)`` from one inference pass, -1 if absent."""
        given = torch.full((n,), -1, dtype=torch.long)
        predicted = torch.full((n,), -1, dtype=torch.long)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError(
                "LabelAudit predicts labels over the training set, but could not find it: "
                "trainer.train_dataloader must be one DataLoader over a dataset with a length "
                "(or the datamodule must have `train_dataset`)"
            )
        # Checked on every rank, so that no rank waits in the broadcast for a failed rank zero.
        if len(dataset) and not is_indexed_sample(dataset[0]):
            raise ValueError(NEEDS_INDEX.format(who="LabelAudit"))
        if len(dataset) and isinstance(dataset[0], Mapping):
            self._check_dict_samples(pl_module)
        rows = None
        # Under FSDP2 a forward is collective (it all-gathers the shards), so with several
        # ranks every rank runs the pass; rank zero's rows are the ones kept.
        if trainer.is_global_zero or trainer.world_size > 1:
            rows = self._predict_rows(trainer, pl_module, dataset)
        if trainer.world_size > 1:
            # Rank zero's model predicts for everyone: under DDP the BatchNorm buffers of the
            # other ranks may differ after the last step (DDP broadcasts rank zero's buffers at
            # the start of each forward, not after it), so their predictions could differ.
            rows = trainer.strategy.broadcast(rows, src=0)
        assert rows is not None
        if rows.numel() and (rows[:, 0].min() < 0 or rows[:, 0].max() >= n):
            raise ValueError(
                f"the training set yields sample indices outside [0, {n}) of the "
                "TrainingDynamics store; indices must be positions in the full training set"
            )
        given[rows[:, 0]] = rows[:, 1]
        predicted[rows[:, 0]] = rows[:, 2]
        return given, predicted

    def _predict_rows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Any
    ) -> Tensor:
        """``[N, 3]`` int64 rows (index, given label, predicted label) on the CPU."""
        loader = trainer.train_dataloader
        plain = DataLoader(
            dataset,
            batch_size=getattr(loader, "batch_size", None) or 64,
            shuffle=False,
            num_workers=getattr(loader, "num_workers", 0),
            collate_fn=getattr(loader, "collate_fn", None),
        )
        rows = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch in plain:
                    if not is_indexed_sample(batch):
                        raise ValueError(NEEDS_INDEX.format(who="LabelAudit"))
                    batch = trainer.strategy.batch_to_device(batch)
                    if isinstance(batch, Mapping):  # a DictSampleModule's samples
                        index = batch["index"]
                        target, logits = pl_module.sample_logits(batch)  # type: ignore[operator]
                    else:
                        inputs, target, index = batch
                        logits = self.predict_logits(pl_module, inputs)
                    prediction = logits.argmax(dim=1)
                    row = torch.stack([index.long(), target.long(), prediction.long()], dim=1)
                    rows.append(row.cpu())
        finally:
            pl_module.train(was_training)
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)

    # ----------------------------------------------------------------- report
    def _write_csv(
        self, statistic: Tensor, noise_mask: Tensor | None, clean: Tensor | None
    ) -> None:
        assert self.ranking is not None and self.scores is not None
        assert self.given_labels is not None and self.predicted_labels is not None
        assert self.flagged is not None and self.csv_path is not None
        rows = self.ranking if self.top_k is None else self.ranking[: self.top_k]
        header = ["rank", "index", "given_label", "predicted_label", "score"]
        header += [_STATISTIC[self.score], "flagged"]
        if noise_mask is not None:
            header.append("is_noisy")
            if clean is not None:
                header.append("clean_label")
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for rank, index in enumerate(rows.tolist()):
                stat = float(statistic[index])
                row: list[Any] = [
                    rank,
                    index,
                    int(self.given_labels[index]),
                    int(self.predicted_labels[index]),
                    repr(float(self.scores[index])),
                    int(stat) if self.score in ("forgetting", "first_learned") else repr(stat),
                    int(self.flagged[index]),
                ]
                if noise_mask is not None:
                    row.append(int(noise_mask[index]))
                    if clean is not None:
                        row.append(int(clean[index]))
                writer.writerow(row)

    def _plot_values(self, statistic: Tensor) -> tuple[Tensor, str]:
        """Finite values to histogram and the axis label."""
        assert self.scores is not None
        if self.score == "aum":
            return statistic, "area under the margin (low: suspicious)"
        if self.score == "loss":
            return statistic, "last loss (high: suspicious)"
        # Forgetting events / first-learned epoch with "never learned" as inf: plot those one
        # step past the largest finite value.
        values = self.scores.clone()
        finite = values[torch.isfinite(values)]
        never = (finite.max() + 1) if finite.numel() else torch.tensor(0.0, dtype=values.dtype)
        values = values.masked_fill(torch.isinf(values), float(never))
        what = "forgetting events" if self.score == "forgetting" else "first-learned epoch"
        return values, f"{what} (never learned at {float(never):g})"

    def _write_plot(self, statistic: Tensor, noise_mask: Tensor | None) -> None:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display

        assert self.ranking is not None and self.flagged is not None
        assert self.plot_path is not None
        values, label = self._plot_values(statistic)
        seen = self.ranking
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        if seen.numel():
            data = values[seen].double()
            groups = [("all samples", data, "tab:blue")]
            if noise_mask is not None:
                groups = [
                    ("clean labels", data[~noise_mask[seen]], "tab:blue"),
                    ("noisy labels", data[noise_mask[seen]], "tab:red"),
                ]
            lo, hi = float(data.min()), float(data.max())
            if self.score in ("forgetting", "first_learned") and hi - lo <= 200:
                bins = torch.arange(lo - 0.5, hi + 1.0, 1.0).tolist()  # one bin per integer
            else:
                bins = torch.linspace(lo, hi if hi > lo else lo + 1, 41).tolist()
            for name, group, color in groups:
                if group.numel():
                    ax.hist(group.numpy(), bins=bins, alpha=0.55, color=color, label=name)
            if self.aum_threshold is not None:
                cut = self.aum_threshold
            else:
                cut = float(values[self.ranking[max(int(self.flagged.sum()), 1) - 1]])
            ax.axvline(cut, color="black", linestyle="--", linewidth=1, label="flag threshold")
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        title = f"LabelAudit score={self.score}"
        if self.detection is not None:
            d = self.detection
            title += f": precision {d['precision']:.2f}, recall {d['recall']:.2f}"
        ax.set_title(title)
        fig.savefig(self.plot_path, dpi=100)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # The audit runs once at the end of fit from the TrainingDynamics store (which that
        # callback checkpoints), so only the hyperparameters are saved, for inspection, and
        # the noise-rate estimate when there is one (fitted on losses the store no longer has).
        extra = {} if self.estimate is None else {"estimate": self.estimate.state_dict()}
        return {
            **extra,
            "score": self.score,
            "top_k": self.top_k,
            "output_dir": self.output_dir,
            "flag_fraction": self.flag_fraction,
            "threshold": self.threshold,
            "threshold_percentile": self.threshold_percentile,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # Only the estimate: the constructor's hyperparameters win (they are the state_key).
        if self.estimate is not None and "estimate" in state_dict:
            self.estimate.load_state_dict(state_dict["estimate"])
