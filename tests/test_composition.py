"""The composition matrix: every exported callback with every other, and every loss with each.

A user's own module and DataModule, written here as a user would (``UserNet``, ``Blobs``),
follow the documented one step (``PerSampleLossMixin``, ``NoiseFiTMixin``, ``Indexed``). Each
combination either trains, checked by invariants that catch real composition bugs (every
stateful method moves once per optimizer step, SAM's second pass reuses the first pass's
sample weights, the dynamics store records each sample once per epoch, ELR's targets move once
per step, the parameters change and stay finite, logs and metrics count each sample once), or
is refused at setup, before any training step, with the message of its rule in
:data:`lightning_noise.callbacks.composition.RULES`. The README's table is that module's
``markdown()``; a test keeps them equal. Under DDP (two CPU processes) the stateful SAM pairs
keep the invariants on each rank and identical replicas.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torchmetrics
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_noise.callbacks as callbacks_module
import lightning_noise.losses as losses_module
from lightning_noise.callbacks import (
    ASAM,
    FSAM,
    SAM,
    AdaptiveK,
    GradientNoise,
    KernelSwap,
    LabelAudit,
    LateStopping,
    NoiseFiT,
    NonFiniteGuard,
    SamplePolicyCallback,
    SmallLossSelection,
)
from lightning_noise.callbacks.composition import NEEDS, RULES, Rule, markdown
from lightning_noise.data import Indexed
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.losses import ELRLoss, LabelSmoothingCrossEntropy, MaxSupLoss, elr_update
from lightning_noise.mixins import NoiseFiTMixin, PerSampleLossMixin
from lightning_noise.types import SampleBatch, find_callback, find_callbacks

ROOT = Path(__file__).resolve().parents[1]

NUM_SAMPLES = 256
BATCH = 32
FEATURES = 16
CLASSES = 10
WIDTH = 32
EPOCHS = 2  # 2 epochs x 8 steps (fewer in Late Stopping's final run)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny fits are latency-bound (and the CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------- the user's data and model
def blobs(seed: int = 0) -> TensorDataset:
    """10 gaussian blobs in 16 dimensions, 256 samples, a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(CLASSES, FEATURES, generator=generator)
    y = torch.arange(NUM_SAMPLES) % CLASSES
    x = centers[y] + torch.randn(NUM_SAMPLES, FEATURES, generator=generator)
    return TensorDataset(x, y)


class Blobs(L.LightningDataModule):
    """A user's DataModule: a TensorDataset of (x, y), wrapped in ``Indexed``."""

    def __init__(self, batch_size: int = BATCH) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set = Indexed(blobs())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class Block(nn.Module):
    """A residual MLP block (NoiseFiT perturbs the output of a chosen one)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.mlp(h)


@dataclass
class StepRecord:
    """One run of ``training_step``: which pass, at which step and epoch, on which samples."""

    second_pass: bool
    step: int
    epoch: int
    index: Tensor
    target: Tensor
    loss: Tensor
    logits: Tensor


class UserNet(PerSampleLossMixin, NoiseFiTMixin, L.LightningModule):
    """A user's classifier following the documented one step, instrumented for the checks.

    The instrumentation records what a composition bug would change: every run of
    ``training_step`` (first pass or SAM's paused second pass), the sample weights the mixin
    hands to ``reduce_loss`` on each pass, and ELR's targets around each criterion call.
    """

    def __init__(self, criterion: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(3))
        self.head = nn.Linear(WIDTH, CLASSES)
        self.criterion = (
            criterion if criterion is not None else nn.CrossEntropyLoss(reduction="none")
        )
        self.samples_seen = torchmetrics.SumMetric()  # never logged, so never reset
        self.in_second_pass = False
        self.steps_log: list[StepRecord] = []
        self.weights_log: list[tuple[bool, int, Tensor | None]] = []
        self.elr_log: list[tuple[bool, Tensor, Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    # The mixin's pausable protocol, extended to know which pass runs.
    @contextlib.contextmanager
    def paused_updates(self) -> Iterator[None]:
        self.in_second_pass = True
        try:
            with super().paused_updates():
                yield
        finally:
            self.in_second_pass = False

    def sample_weights(self, batch: SampleBatch) -> Tensor | None:
        weights = super().sample_weights(batch)
        kept = None if weights is None else weights.detach().clone()
        self.weights_log.append((self.in_second_pass, self.global_step, kept))
        return weights

    def on_train_epoch_start(self) -> None:
        if isinstance(self.criterion, MaxSupLoss):  # the loss's documented ramp
            self.criterion.set_progress(self.current_epoch, self.trainer.max_epochs)

    def per_sample_loss(self, logits: Tensor, y: Tensor, index: Tensor) -> Tensor:
        if getattr(self.criterion, "needs_index", False):
            return self.criterion(logits, y, index=index)
        return self.criterion(logits, y)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y, index = batch
        logits = self(x)
        elr = self.criterion if isinstance(self.criterion, ELRLoss) else None
        before = None if elr is None else elr.targets.detach().clone()
        losses = self.per_sample_loss(logits, y, index)
        if elr is not None:
            after = elr.targets.detach().clone()
            self.elr_log.append(
                (self.in_second_pass, before, after, index.clone(), logits.detach())
            )
        self.steps_log.append(
            StepRecord(
                self.in_second_pass,
                self.global_step,
                self.current_epoch,
                index.detach().clone(),
                y.detach().clone(),
                losses.detach().clone(),
                logits.detach().clone(),
            )
        )
        for callback in self.trainer.callbacks:  # a user's own per-step hook (see UserCounter)
            hook = getattr(callback, "on_user_step", None)
            if hook is not None:
                hook(self)
        self.samples_seen.update(torch.tensor(float(len(y))))
        self.log("train/samples", float(len(y)), reduce_fx="sum", on_step=False, on_epoch=True)
        sample_batch = SampleBatch.create(index, y, logits, losses)
        loss = self.reduce_loss(losses, sample_batch)
        loss = self.noisefit_loss(loss, logits, lambda: self(x))
        return self.step_outputs(loss, sample_batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LossCut(SamplePolicyCallback):
    """A user's own sample policy: one method. Keeps the samples at or below the median loss."""

    def select(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: SampleBatch
    ) -> Tensor:
        return (batch.loss <= batch.loss.median()).float()


class Probe(L.Callback):
    """Records whether training started (refusals must come before it)."""

    def __init__(self) -> None:
        self.train_started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_started = True


# ------------------------------------------------------------------------------ factories
#: One small instance of every exported callback (``lightning_noise.callbacks.__all__`` and
#: ``TrainingDynamics``); ``SamplePolicyCallback`` is a base class, so a user's subclass.
FACTORIES: dict[str, Callable[[Path], L.Callback]] = {
    "TrainingDynamics": lambda tmp: TrainingDynamics(k=1),
    "LateStopping": lambda tmp: LateStopping(
        rate=0.1, rounds_per_k=(1,), warmup_epochs=0, final_epochs=1
    ),
    "LabelAudit": lambda tmp: LabelAudit(output_dir=str(tmp / "audit")),
    "SmallLossSelection": lambda tmp: SmallLossSelection(forget_rate=0.3, num_gradual=1),
    "AdaptiveK": lambda tmp: AdaptiveK(warmup_epochs=0),
    "SamplePolicyCallback": lambda tmp: LossCut(),
    "NoiseFiT": lambda tmp: NoiseFiT(num_layers=1, calibration_passes=2),
    "KernelSwap": lambda tmp: KernelSwap(),
    "SAM": lambda tmp: SAM(rho=0.05),
    "ASAM": lambda tmp: ASAM(rho=0.5),
    "FSAM": lambda tmp: FSAM(rho=0.05, keep_ratio=0.5, mask_interval=4),
    "GradientNoise": lambda tmp: GradientNoise(eta=0.01),
    "NonFiniteGuard": lambda tmp: NonFiniteGuard(max_consecutive=3),
}
#: The order in which a user lists them: TrainingDynamics before its readers, SAM before
#: GradientNoise (``test_user_order_respects_every_order_rule`` checks it against RULES).
USER_ORDER = list(FACTORIES)

#: Every loss module of ``lightning_noise.losses``, per sample (``reduction="none"``).
LOSS_CLASSES = sorted(
    (
        obj
        for name in losses_module.__all__
        if isinstance(obj := getattr(losses_module, name), type) and issubclass(obj, nn.Module)
    ),
    key=lambda cls: cls.__name__,
)


def make_loss(cls: type[nn.Module], **kwargs: Any) -> nn.Module:
    if cls is ELRLoss:
        kwargs.setdefault("num_samples", NUM_SAMPLES)
    return cls(**{**kwargs, "reduction": "none"})


def class_names(callback: Any) -> set[str]:
    """The callback's class and its bases by name (a rule naming SAM covers ASAM, FSAM)."""
    return {cls.__name__ for cls in type(callback).__mro__}


def with_needs(callbacks: list[L.Callback], tmp: Path) -> list[L.Callback]:
    """``callbacks`` with what the ``needs`` rules ask for, put first (a reader comes after)."""
    added: list[L.Callback] = []
    for rule in RULES:
        if rule.kind != "needs":
            continue
        present = [*added, *callbacks]
        needs_it = any(rule.first in class_names(cb) for cb in callbacks)
        if needs_it and not any(rule.second in class_names(cb) for cb in present):
            added.append(FACTORIES[rule.second](tmp))
    return [*added, *callbacks]


def refusing_rule(callbacks: list[L.Callback]) -> Rule | None:
    """The ``exclusive`` or ``order`` rule that ``callbacks`` (in this order) break, if any."""
    for rule in RULES:
        for i, a in enumerate(callbacks):
            for b in callbacks[i + 1 :]:
                if rule.kind == "exclusive" and (
                    (rule.first in class_names(a) and rule.second in class_names(b))
                    or (rule.first in class_names(b) and rule.second in class_names(a))
                ):
                    return rule
                if (
                    rule.kind == "order"
                    and rule.second in class_names(a)
                    and rule.first in class_names(b)
                ):
                    return rule
    return None


# ---------------------------------------------------------------------------------- fitting
@dataclass
class Run:
    trainer: L.Trainer
    model: UserNet
    callbacks: list[L.Callback]
    initial: dict[str, Tensor]
    select_calls: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)

    def first_passes(self) -> list[StepRecord]:
        return [r for r in self.model.steps_log if not r.second_pass]

    def second_passes(self) -> list[StepRecord]:
        return [r for r in self.model.steps_log if r.second_pass]


def spy_on_policies(run: Run) -> None:
    """Count every ``select`` of every sample policy: (global step, in SAM's second pass)."""
    for callback in run.callbacks:
        if not isinstance(callback, SamplePolicyCallback):
            continue
        calls: list[tuple[int, bool]] = []
        run.select_calls[id(callback)] = calls
        original = callback.select

        def select(trainer, pl_module, batch, _original=original, _calls=calls):
            _calls.append((trainer.global_step, pl_module.in_second_pass))
            return _original(trainer, pl_module, batch)

        callback.select = select  # type: ignore[method-assign]


def trainer_for(callbacks: list[L.Callback], tmp: Path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def prepare(
    callbacks: list[L.Callback],
    tmp: Path,
    criterion: nn.Module | None = None,
    model_cls: type[UserNet] = UserNet,
    **kwargs: Any,
) -> Run:
    L.seed_everything(0, verbose=False)
    model = model_cls(criterion)
    initial = {k: p.detach().clone() for k, p in model.named_parameters()}
    run = Run(trainer_for(callbacks, tmp, **kwargs), model, callbacks, initial)
    spy_on_policies(run)
    return run


def fit(
    callbacks: list[L.Callback],
    tmp: Path,
    criterion: nn.Module | None = None,
    model_cls: type[UserNet] = UserNet,
    **kwargs: Any,
) -> Run:
    run = prepare(callbacks, tmp, criterion, model_cls, **kwargs)
    run.trainer.fit(run.model, datamodule=Blobs())
    return run


def assert_refused(callbacks: list[L.Callback], tmp: Path, rule: Rule) -> None:
    """The combination is refused at setup: the rule's message, before training starts."""
    probe = Probe()
    run = prepare([*callbacks, probe], tmp)
    with pytest.raises((RuntimeError, ValueError), match=re.escape(rule.message)):
        run.trainer.fit(run.model, datamodule=Blobs())
    assert not probe.train_started, "refused only after training started"
    assert run.model.steps_log == [], "a training step ran before the refusal"
    assert run.trainer.global_step == 0


# ------------------------------------------------------------------------------- invariants
def check_steps(run: Run) -> int:
    """One first pass per optimizer step; under SAM one second pass on the same batch."""
    steps = run.trainer.global_step
    first, second = run.first_passes(), run.second_passes()
    assert steps > 0
    assert [r.step for r in first] == list(range(steps)), "not one first pass per step"
    sam = find_callback(run.trainer, SAM)
    if sam is None:
        assert second == [], "a second pass ran without SAM"
        return steps
    assert sam.skipped_steps == 0
    assert [r.step for r in second] == list(range(steps)), "not one second pass per SAM step"
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.index, b.index), "SAM's second pass saw another batch"
    return steps


def check_policies(run: Run, steps: int) -> None:
    """(a) Every policy's ``select`` ran once per optimizer step, never in the second pass;
    Adaptive-k's moving averages moved once per step."""
    for callback in run.callbacks:
        if not isinstance(callback, SamplePolicyCallback):
            continue
        calls = run.select_calls[id(callback)]
        assert [s for s, _ in calls] == list(range(steps)), (type(callback).__name__, calls)
        assert not any(second for _, second in calls), "a policy was asked in the second pass"
        if isinstance(callback, AdaptiveK):
            assert callback.steps == steps, (callback.steps, steps)


def check_weights_reused(run: Run, steps: int) -> None:
    """(b) SAM's second pass reduced with the first pass's weights, call for call."""
    first = [(s, w) for second, s, w in run.model.weights_log if not second]
    second = [(s, w) for is_second, s, w in run.model.weights_log if is_second]
    assert [s for s, _ in first] == list(range(steps)), "reduce_loss not once per step"
    if find_callback(run.trainer, SAM) is None:
        assert second == []
        return
    assert [s for s, _ in second] == [s for s, _ in first]
    for (step, a), (_, b) in zip(first, second, strict=True):
        if a is None or b is None:
            assert a is None and b is None, step
        else:
            assert torch.equal(a, b), f"step {step}: the second pass used other weights"
    if find_callbacks(run.trainer, SamplePolicyCallback):
        assert all(w is not None for _, w in first)


def expected_sets(run: Run) -> dict[int, Tensor]:
    """The training set of each epoch: all samples, or Late Stopping's kept set after a round."""
    late = find_callback(run.trainer, LateStopping)
    out = {}
    for epoch in sorted({r.epoch for r in run.first_passes()}):
        if late is not None and late.kept is not None and epoch >= late.round_start_epoch:
            out[epoch] = late.kept.sort().values
        else:
            out[epoch] = torch.arange(NUM_SAMPLES)
    return out


def check_epochs(records: list[StepRecord], sets: dict[int, Tensor]) -> None:
    """Each epoch's first passes saw each sample of that epoch's training set once."""
    for epoch, expected in sets.items():
        seen = torch.cat([r.index for r in records if r.epoch == epoch]).sort().values
        assert torch.equal(seen, expected), f"epoch {epoch}: samples not seen once each"


def check_dynamics(store: Any, records: list[StepRecord]) -> None:
    """(c) The store recorded each sample once per epoch it was trained on, from the first
    pass's outputs (not the perturbed second pass)."""
    counts: Counter[int] = Counter()
    last: dict[int, float] = {}
    epochs: dict[int, dict[int, int | None]] = {}  # epoch -> sample -> correct (if known)
    for r in sorted(records, key=lambda r: r.epoch):  # chronological per sample
        known = r.logits.numel() > 0
        correct = (r.logits.argmax(1) == r.target).tolist() if known else [None] * len(r.index)
        for i, loss, ok in zip(r.index.tolist(), r.loss.tolist(), correct, strict=True):
            counts[i] += 1
            last[i] = loss
            epochs.setdefault(r.epoch, {})[i] = None if ok is None else int(ok)
    expected_count = torch.tensor([counts[i] for i in range(NUM_SAMPLES)])
    assert torch.equal(store.update_count, expected_count), "not recorded once per epoch"
    history = store.history
    for epoch, seen in epochs.items():
        column = history[:, epoch]
        recorded = set(torch.nonzero(column >= 0).flatten().tolist())
        assert recorded == set(seen), f"epoch {epoch}: recorded {len(recorded)} of {len(seen)}"
        for i, ok in seen.items():
            assert ok is None or int(column[i]) == ok, f"epoch {epoch}, sample {i}: correctness"
    for i, loss in last.items():
        assert store.last_loss[i].item() == pytest.approx(loss, rel=1e-6, abs=1e-6), (
            f"sample {i}: the store kept another pass's loss"
        )


def check_elr(run: Run, steps: int) -> None:
    """(d) ELR's targets moved once per step, from the first pass's predictions; the second
    pass left them as they were."""
    criterion = run.model.criterion
    if not isinstance(criterion, ELRLoss):
        return
    first = [entry for entry in run.model.elr_log if not entry[0]]
    assert len(first) == steps, "ELR's criterion not called once per step"
    for second, before, after, index, logits in run.model.elr_log:
        if second:
            assert torch.equal(before, after), "the second pass moved ELR's targets"
            continue
        expected = torch.zeros_like(after)
        expected[: before.shape[0], : before.shape[1]] = before
        probs = logits.softmax(-1).clamp(1e-4, 1 - 1e-4)
        expected[index] = elr_update(expected[index], probs, criterion.beta)
        torch.testing.assert_close(after, expected)


def check_parameters(run: Run) -> None:
    """(e) Finite parameters that moved from the initial ones."""
    moved = False
    for name, p in run.model.named_parameters():
        assert torch.isfinite(p).all(), name
        moved = moved or not torch.equal(p.detach(), run.initial[name])
    assert moved, "training did not change the parameters"


def check_logs(run: Run) -> None:
    """(f) Logged sums and torchmetrics count each sample once, also under SAM."""
    first = run.first_passes()
    total = sum(len(r.index) for r in first)
    assert run.model.samples_seen.compute().item() == total
    last_epoch = max(r.epoch for r in first)
    in_last = sum(len(r.index) for r in first if r.epoch == last_epoch)
    assert run.trainer.callback_metrics["train/samples"].item() == in_last


def check_callbacks_acted(run: Run) -> None:
    """Each callback did its job, so the combination was really exercised."""
    model = run.model
    for callback in run.callbacks:
        if isinstance(callback, LateStopping):
            assert callback.finished and callback.kept is not None
        elif isinstance(callback, LabelAudit):
            assert callback.ranking is not None and callback.ranking.numel() == NUM_SAMPLES
            assert Path(callback.csv_path).is_file()
        elif isinstance(callback, NoiseFiT):
            assert len(callback.selected) == 1
        elif isinstance(callback, KernelSwap) and isinstance(
            model.criterion, nn.CrossEntropyLoss | LabelSmoothingCrossEntropy | MaxSupLoss
        ):
            assert callback.replaced, "KernelSwap replaced nothing"


def check_invariants(run: Run) -> None:
    steps = check_steps(run)
    check_policies(run, steps)
    check_weights_reused(run, steps)
    check_epochs(run.first_passes(), expected_sets(run))
    dynamics = find_callback(run.trainer, TrainingDynamics)
    if dynamics is not None:
        check_dynamics(dynamics.store, run.first_passes())
    check_elr(run, steps)
    check_parameters(run)
    check_logs(run)
    check_callbacks_acted(run)


def build(names: tuple[str, ...], tmp: Path) -> list[L.Callback]:
    ordered = sorted(names, key=USER_ORDER.index)
    return with_needs([FACTORIES[name](tmp) for name in ordered], tmp)


def train_or_refuse(names: tuple[str, ...], tmp: Path, criterion: nn.Module | None = None) -> None:
    callbacks = build(names, tmp)
    rule = refusing_rule(callbacks)
    if rule is not None:
        assert_refused(callbacks, tmp, rule)
        return
    check_invariants(fit(callbacks, tmp, criterion))


# -------------------------------------------------------------------------------- the matrix
def test_every_exported_callback_has_a_factory() -> None:
    # ResumableCheckpoint saves checkpoints and changes no training: what it must compose
    # with is a resume, tested with a real SIGKILL in tests/test_crash_resume.py.
    exported = set(callbacks_module.__all__) - {"ResumableCheckpoint"} | {"TrainingDynamics"}
    assert set(FACTORIES) == exported
    for name, make in FACTORIES.items():
        assert name in class_names(make(Path("unused")))


def test_user_order_respects_every_order_rule() -> None:
    for rule in RULES:
        if rule.kind == "order":
            firsts = [n for n in USER_ORDER if rule.first in class_names(FACTORIES[n](Path("x")))]
            seconds = [n for n in USER_ORDER if rule.second in class_names(FACTORIES[n](Path("x")))]
            assert firsts and seconds, rule
            assert max(map(USER_ORDER.index, firsts)) < min(map(USER_ORDER.index, seconds))


def test_rules_name_exported_callbacks() -> None:
    names = set(FACTORIES)
    for rule in RULES:
        assert {rule.first, rule.second} <= names, rule
        assert rule.message, rule


def test_every_gradient_changing_callback_has_an_order_rule_with_sam() -> None:
    """SAM replaces the gradient: a callback that changes it too must be ordered by a rule."""
    for name, make in FACTORIES.items():
        callback = make(Path("x"))
        if isinstance(callback, SAM):
            continue
        if type(callback).on_before_optimizer_step is not L.Callback.on_before_optimizer_step:
            assert any(
                r.kind == "order" and r.first == "SAM" and r.second in class_names(callback)
                for r in RULES
            ), name


SINGLES = [(name,) for name in USER_ORDER]
PAIRS = list(itertools.combinations(USER_ORDER, 2))


@pytest.mark.filterwarnings("ignore:KernelSwap found no")
@pytest.mark.parametrize("names", SINGLES + PAIRS, ids=lambda names: "+".join(names))
def test_callbacks_compose(tmp_path, names) -> None:
    train_or_refuse(names, tmp_path)


@pytest.mark.filterwarnings("ignore:KernelSwap found no")
@pytest.mark.parametrize("name", USER_ORDER)
@pytest.mark.parametrize("loss", LOSS_CLASSES, ids=lambda cls: cls.__name__)
def test_each_loss_with_each_callback(tmp_path, loss, name) -> None:
    train_or_refuse((name,), tmp_path, make_loss(loss))


def recipe_combinations() -> list[tuple[str, tuple[str, ...], type[nn.Module] | None, dict]]:
    """(recipe, our callbacks, loss class, loss init args) of the recipes that compose three
    or more parts (callbacks and loss); the pairs are in the matrices above."""
    out = []
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        names = tuple(
            cb["class_path"].rsplit(".", 1)[1]
            for cb in config.get("trainer", {}).get("callbacks") or []
            if cb["class_path"].rsplit(".", 1)[1] in FACTORIES
        )
        criterion = config.get("model", {}).get("init_args", {}).get("criterion")
        loss = None
        args: dict = {}
        if criterion:
            loss = getattr(losses_module, criterion["class_path"].rsplit(".", 1)[1])
            args = dict(criterion.get("init_args") or {})
        if len(names) + (loss is not None) >= 3:
            out.append((path.stem, names, loss, args))
    return out


RECIPES = recipe_combinations()


def test_recipes_compose_three_parts() -> None:
    assert any(
        set(names) >= {"SAM", "LateStopping", "TrainingDynamics"} and loss is MaxSupLoss
        for _, names, loss, _ in RECIPES
    ), RECIPES


@pytest.mark.parametrize(("recipe", "names", "loss", "args"), RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_combinations(tmp_path, recipe, names, loss, args) -> None:
    # The recipe's own order (e.g. TrainingDynamics, LateStopping, SAM), our small settings.
    callbacks = with_needs([FACTORIES[name](tmp_path) for name in names], tmp_path)
    assert refusing_rule(callbacks) is None
    criterion = None if loss is None else make_loss(loss, **args)
    check_invariants(fit(callbacks, tmp_path, criterion))


# --------------------------------------------------------------------------------- refusals
SAM_FAMILY = ["SAM", "ASAM", "FSAM"]
ORDER_CASES = [
    (rule, first, second)
    for rule in RULES
    if rule.kind == "order"
    for first in USER_ORDER
    if rule.first in class_names(FACTORIES[first](Path("x")))
    for second in USER_ORDER
    if rule.second in class_names(FACTORIES[second](Path("x")))
]
EXCLUSIVE_CASES = [
    (rule, a, b)
    for rule in RULES
    if rule.kind == "exclusive"
    for a, b in itertools.combinations_with_replacement(USER_ORDER, 2)
    if rule.first in class_names(FACTORIES[a](Path("x")))
    and rule.second in class_names(FACTORIES[b](Path("x")))
]
NEEDS_CASES = [
    (rule, name)
    for rule in RULES
    if rule.kind == "needs"
    for name in USER_ORDER
    if rule.first in class_names(FACTORIES[name](Path("x")))
]


@pytest.mark.parametrize(
    ("rule", "first", "second"), ORDER_CASES, ids=[f"{s}-before-{f}" for _, f, s in ORDER_CASES]
)
def test_order_rule_refuses_the_wrong_order_at_setup(tmp_path, rule, first, second) -> None:
    callbacks = [FACTORIES[second](tmp_path), FACTORIES[first](tmp_path)]  # wrong order
    assert_refused(callbacks, tmp_path, rule)
    check_invariants(fit([FACTORIES[first](tmp_path), FACTORIES[second](tmp_path)], tmp_path))


#: A second instance with other settings (two equal instances: see the test after next).
OTHER_SETTINGS: dict[str, Callable[[], L.Callback]] = {
    "SAM": lambda: SAM(rho=0.1),
    "ASAM": lambda: ASAM(rho=1.0),
    "FSAM": lambda: FSAM(rho=0.1, keep_ratio=0.5, mask_interval=4),
}


@pytest.mark.parametrize(
    ("rule", "a", "b"), EXCLUSIVE_CASES, ids=[f"{a}+{b}" for _, a, b in EXCLUSIVE_CASES]
)
def test_exclusive_rule_refuses_at_setup(tmp_path, rule, a, b) -> None:
    second = OTHER_SETTINGS[b]() if a == b else FACTORIES[b](tmp_path)
    assert_refused([FACTORIES[a](tmp_path), second], tmp_path, rule)


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_two_equal_sam_callbacks_are_refused_before_setup(tmp_path, name) -> None:
    """Two *equal* instances of one SAM class never reach setup: ``Trainer()`` refuses
    callbacks with one ``state_key`` (Lightning's check; RULES says so in the rule's why)."""
    rule = next(r for r in RULES if r.kind == "exclusive" and r.first == r.second == "SAM")
    assert "Trainer()" in rule.why
    with pytest.raises(RuntimeError, match=f"more than one stateful callback of type `{name}`"):
        fit([FACTORIES[name](tmp_path), FACTORIES[name](tmp_path)], tmp_path)


@pytest.mark.parametrize(("rule", "name"), NEEDS_CASES, ids=[n for _, n in NEEDS_CASES])
def test_needs_rule_refuses_at_setup(tmp_path, rule, name) -> None:
    assert_refused([FACTORIES[name](tmp_path)], tmp_path, rule)


def test_refusal_cases_cover_every_rule() -> None:
    covered = {id(r) for r, *_ in ORDER_CASES + EXCLUSIVE_CASES + NEEDS_CASES}
    assert covered == {id(r) for r in RULES}
    # Two instances of one SAM class are refused too (exclusive with itself).
    assert {(a, b) for _, a, b in EXCLUSIVE_CASES} >= {(n, n) for n in SAM_FAMILY}


# ------------------------------------------------------------------- a user's own extensions
class UserCounter(L.Callback):
    """A user's own stateful callback: counts the steps through a hook that training_step
    calls; pausable, so SAM's second pass does not move it."""

    def __init__(self) -> None:
        self.count = 0
        self._paused = False

    @contextlib.contextmanager
    def paused_updates(self) -> Iterator[None]:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def on_user_step(self, pl_module: L.LightningModule) -> None:
        if not self._paused:
            self.count += 1


class UnpausableCounter(L.Callback):
    """The same counter without ``paused_updates``: the control that the pass re-runs."""

    def __init__(self) -> None:
        self.count = 0

    def on_user_step(self, pl_module: L.LightningModule) -> None:
        self.count += 1


@pytest.mark.parametrize("sam", SAM_FAMILY)
def test_users_pausable_callback_is_paused_in_the_second_pass(tmp_path, sam) -> None:
    counter, control = UserCounter(), UnpausableCounter()
    run = fit([FACTORIES[sam](tmp_path), counter, control], tmp_path)
    check_invariants(run)
    steps = run.trainer.global_step
    assert counter.count == steps
    assert control.count == 2 * steps  # the second pass did run training_step again


def test_users_own_sample_policy_composes_with_sam(tmp_path) -> None:
    policy = LossCut()
    run = fit([SAM(rho=0.05), policy], tmp_path)
    check_invariants(run)
    # The kept set of each step is the policy's rule on the first pass's (unperturbed) losses.
    logs = zip(run.model.weights_log, run.model.steps_log, strict=True)
    first = [(w, r) for (second, _, w), r in logs if not second]
    assert len(first) == run.trainer.global_step
    for weights, record in first:
        assert torch.equal(weights, (record.loss <= record.loss.median()).float())
    assert all(0 < w.sum() < len(w) for w, _ in first)


class UnpausedNet(UserNet):
    """The bug this matrix guards against: SAM's second pass asks the policies again."""

    @contextlib.contextmanager
    def paused_updates(self) -> Iterator[None]:
        self.in_second_pass = True  # without the mixin's pause
        try:
            yield
        finally:
            self.in_second_pass = False


@pytest.mark.parametrize("policy", ["AdaptiveK", "SmallLossSelection"])
def test_the_invariants_catch_a_second_pass_that_asks_the_policies_again(tmp_path, policy) -> None:
    run = fit([FACTORIES[policy](tmp_path), SAM(rho=0.05)], tmp_path, model_cls=UnpausedNet)
    steps = check_steps(run)
    with pytest.raises(AssertionError):
        check_policies(run, steps)
    calls = next(iter(run.select_calls.values()))
    assert len(calls) == 2 * steps  # asked twice per optimizer step
    if policy == "AdaptiveK":
        assert find_callback(run.trainer, AdaptiveK).steps == 2 * steps


class NetWithExtraState(UserNet):
    """A module with extra state in its ``state_dict`` (as ELRLoss has: its targets)."""

    def get_extra_state(self) -> dict[str, int]:
        return {"version": 1}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.restored_state = state


def test_late_stopping_restarts_a_module_with_extra_state(tmp_path) -> None:
    """Late Stopping snapshots ``state_dict()`` at fit start to re-initialise each round; an
    ``_extra_state`` entry (ELRLoss's targets, any module's ``get_extra_state``) is no tensor.
    Fails until the snapshot copies non-tensor entries (late_stopping.py, ``on_fit_start``)."""
    callbacks = with_needs([FACTORIES["LateStopping"](tmp_path)], tmp_path)
    run = fit(callbacks, tmp_path, model_cls=NetWithExtraState)
    check_invariants(run)
    assert run.model.restored_state == {"version": 1}  # the restart restored it


# -------------------------------------------------------------------------------------- DDP
DDP_PAIRS = {
    "sam_adaptive_k": ("AdaptiveK", "SAM"),
    "sam_small_loss": ("SmallLossSelection", "SAM"),
    "sam_dynamics": ("TrainingDynamics", "SAM"),
}


def _ddp_main(out_dir: str) -> None:
    from _trainers import ddp_trainer

    torch.set_num_threads(1)

    for key, names in DDP_PAIRS.items():
        tmp = Path(out_dir)
        callbacks = [FACTORIES[name](tmp) for name in names]
        L.seed_everything(0, verbose=False)
        model = UserNet()
        run = Run(
            ddp_trainer(callbacks, max_epochs=EPOCHS),
            model,
            callbacks,
            {k: p.detach().clone() for k, p in model.named_parameters()},
        )
        spy_on_policies(run)
        run.trainer.fit(model, datamodule=Blobs())
        # The invariants that hold per rank; the store's are checked across ranks by the test.
        steps = check_steps(run)
        check_policies(run, steps)
        check_weights_reused(run, steps)
        check_parameters(run)
        dynamics = find_callback(run.trainer, TrainingDynamics)
        adaptive = find_callback(run.trainer, AdaptiveK)
        result = {
            "steps": steps,
            "params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "adaptive_k": None if adaptive is None else adaptive.state_dict(),
            "records": [(r.epoch, r.index, r.loss) for r in run.first_passes()],
            "store": None if dynamics is None else dynamics.store.state_dict(),
        }
        torch.save(result, tmp / f"{key}_rank{run.trainer.global_rank}.pt")
        run.trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # 14 s; SAM under DDP stays in tests/callbacks/test_sam.py's default tests
@pytest.mark.ddp
def test_stateful_sam_pairs_under_ddp(tmp_path) -> None:
    from _ddp import run_ddp_script

    from lightning_noise.dynamics.store import DynamicsStore

    run_ddp_script(__file__, tmp_path)
    for key in DDP_PAIRS:
        ranks = [torch.load(tmp_path / f"{key}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert ranks[0]["steps"] == ranks[1]["steps"] == EPOCHS * NUM_SAMPLES // (2 * BATCH)
        for name, value in ranks[0]["params"].items():
            assert torch.equal(value, ranks[1]["params"][name]), f"{key}: {name} diverged"
        assert ranks[0]["adaptive_k"] == ranks[1]["adaptive_k"], key
        if ranks[0]["adaptive_k"] is not None:
            assert ranks[0]["adaptive_k"]["steps"] == ranks[0]["steps"]
        # Together the ranks saw every sample once per epoch.
        records = [
            StepRecord(False, 0, epoch, index, index, loss, torch.zeros(0))
            for rank in ranks
            for epoch, index, loss in rank["records"]
        ]
        check_epochs(records, {e: torch.arange(NUM_SAMPLES) for e in range(EPOCHS)})
        if ranks[0]["store"] is not None:
            stores = []
            for rank in ranks:
                store = DynamicsStore()
                store.load_state_dict(rank["store"])
                stores.append(store)
            assert torch.equal(stores[0].history, stores[1].history)
            assert torch.equal(stores[0].update_count, stores[1].update_count)
            check_dynamics(stores[0], records)


# ----------------------------------------------------------------------------------- README
def test_readme_shows_the_composition_tables() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- composition:start -->\n(.*?)\n<!-- composition:end -->", readme, re.S)
    assert match, "README.md has no composition block"
    assert match.group(1) == markdown()


def test_needs_lists_every_exported_callback() -> None:
    listed = " ".join(n.callback for n in NEEDS)
    for name in FACTORIES:
        assert re.search(rf"\b{name}\b", listed), name


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
