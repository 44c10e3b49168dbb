"""Robustness to label noise: the noisy-label methods against cross-entropy on digits.

Trains each method on the embedded digits under several kinds of synthetic label noise and
prints, per noise setting and method, the test accuracy at the last epoch and at the best
epoch (mean and spread over seeds), and the noise-detection F1 where the method detects
noisy labels. Seeds set the split, the noise and the initialisation.

Rows:

* ``CE``: plain cross-entropy; its detection F1 is the label audit's (AUM, Pleiss et al.
  2020) with the flagged fraction set to the realised noise rate.
* ``SAM``: SAM (rho 0.5, the radius that wins on this problem; benchmarks/RESULTS.md).
* ``Small-loss``: ``SmallLossSelection`` with forget rate = the noise rate, T_k = 10.
* ``Co-teaching`` / ``Co-teaching+``: ``CoTeachingClassifier`` with forget rate = the
  realised noise rate, T_k = 10 (Co-teaching+ exchanges disagreements from epoch 5).
* Losses (``--methods``): ``Label smoothing`` (0.1), ``MaxSup`` (alpha 0.1 to 0.2), ``GCE``
  (q 0.7), ``SCE`` (0.1, 1.0), ``NCE+RCE`` and ``NCE+MAE`` (1, 1), ``ELR`` (beta 0.7, lambda 3):
  ImageClassifier with that criterion. ``--settings clean`` trains without label noise.
* ``Late Stopping``: rounds (k = 1, 1, 2, 3) each keeping ``(1 - noise rate) ** (1 / 4)``
  of the full set, 2 warm-up epochs per round, 15 final epochs; its F1 is that of the
  removed samples. Its "best" is over the final run only (the earlier rounds' models are
  intermediate), and it trains for as many epochs as its schedule takes (``epochs`` column).
  By default the final run keeps the rounds' optimizer (SGD ``--lr``, constant); ``--final-lr``
  gives it its own SGD learning rate and ``--final-milestones`` a ``MultiStepLR`` (gamma 0.5)
  over its epochs, as the paper's final run has (lr 0.02, milestones 10, 20, 40, 60, 80).

Without the noise rate (``--forget-rate estimate``): Small-loss, Co-teaching and Co-teaching+
take ``forget_rate="estimate"`` (a two-component Gaussian mixture on the per-sample losses of
the early epochs, DivideMix's, refitted each epoch until the ramp ends, the largest fit kept;
``TrainingDynamics`` records the losses) and CE's label audit flags the estimated fraction
(``flag_fraction="estimate"``) instead of the realised noise rate; the rows are recorded as
``<method> (estimated rate)`` and print the estimate beside the true rate. Late Stopping's
rate still comes from the noise rate (its card says why).

Every other method trains ``--epochs`` epochs. "best" is the highest test accuracy over the
epochs (as Co-teaching reports it): optimistic, since it picks the epoch on the test set.

Run: ``python benchmarks/robustness.py`` (``--help`` for sizes, ``--methods``,
``--settings``). Results are appended to ``benchmarks/results.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from common import append_results, device_name
from torch import nn

from lightning_noise.callbacks import SAM, LabelAudit, LateStopping, SmallLossSelection
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.losses import (
    ELRLoss,
    GeneralizedCrossEntropy,
    LabelSmoothingCrossEntropy,
    MaxSupLoss,
    NCEandMAE,
    NCEandRCE,
    SymmetricCrossEntropy,
)
from lightning_noise.models import CoTeachingClassifier, ImageClassifier
from lightning_noise.types import find_callback


@dataclass(frozen=True)
class NoiseSetting:
    name: str
    noise: str
    rate: float


SETTINGS = {
    s.name: s
    for s in (
        NoiseSetting("sym-20", "symmetric", 0.2),
        NoiseSetting("sym-40", "symmetric", 0.4),
        NoiseSetting("sym-60", "symmetric", 0.6),
        NoiseSetting("pair-45", "pair", 0.45),
        NoiseSetting("clean", "symmetric", 0.0),  # not a default: for the losses' comparison
    )
}
DEFAULT_SETTINGS = ["sym-20", "sym-40", "sym-60", "pair-45"]


class EpochTestAccuracy(pl.Callback):
    """Test accuracy of the model at the end of every training epoch.

    Put it before ``LateStopping`` in ``callbacks``: it then measures each epoch's model
    before a round switch re-initialises it, and marks the epochs of the final run.
    """

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self.accuracy: list[float] = []
        self.final_run: list[bool] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in self.loader:
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                correct += int((pl_module(x).argmax(dim=1) == y).sum())
                total += y.numel()
        pl_module.train(was_training)
        self.accuracy.append(correct / total)
        late = find_callback(trainer, LateStopping)
        self.final_run.append(late is None or late.in_final_run)


def late_stopping_rate(noise_rate: float, rounds: int = 4) -> float:
    """Per-round kept fraction that keeps as many samples as are clean after ``rounds``."""
    return (1.0 - noise_rate) ** (1.0 / rounds)


#: method -> (args, setting) -> (model, callbacks, max_epochs). Later methods add theirs.
Builder = Callable[[argparse.Namespace, NoiseSetting], tuple[pl.LightningModule, list, int]]


def _optimizer(args: argparse.Namespace) -> Callable:
    return lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=5e-4)


def _classifier(args: argparse.Namespace, criterion: nn.Module | None = None) -> ImageClassifier:
    return ImageClassifier(
        args.backbone,
        num_classes=10,
        in_chans=args.channels,
        optimizer=_optimizer(args),
        criterion=criterion,
    )


def _loss_row(make: Callable[[], nn.Module]) -> Builder:
    """A row that trains ImageClassifier with the loss ``make()`` as its criterion."""
    return lambda a, s: (_classifier(a, make()), [], a.epochs)


def _estimated(args: argparse.Namespace) -> bool:
    return args.forget_rate == "estimate"


def _coteaching(args: argparse.Namespace, plus: bool) -> CoTeachingClassifier:
    return CoTeachingClassifier(
        args.backbone,
        num_classes=10,
        in_chans=args.channels,
        optimizer=_optimizer(args),
        # None: the realised noise rate, Co-teaching's choice (an oracle); or the estimate.
        forget_rate="estimate" if _estimated(args) else None,
        num_gradual=10,
        plus_start_epoch=5 if plus else None,
        estimate_until=args.estimate_until if _estimated(args) else None,
    )


def _dynamics(args: argparse.Namespace) -> list:
    """``TrainingDynamics`` for the rows that estimate the noise rate from the losses."""
    return [TrainingDynamics()] if _estimated(args) else []


METHODS: dict[str, Builder] = {
    "CE": lambda a, s: (
        _classifier(a),
        [
            TrainingDynamics(),
            LabelAudit(
                "aum",
                output_dir=str(a.root / "audit"),
                flag_fraction="estimate" if _estimated(a) else None,
            ),
        ],
        a.epochs,
    ),
    "SAM": lambda a, s: (_classifier(a), [SAM(rho=a.rho)], a.epochs),
    "Small-loss": lambda a, s: (
        _classifier(a),
        [
            *_dynamics(a),
            SmallLossSelection(
                forget_rate="estimate" if _estimated(a) else s.rate,
                num_gradual=10,
                estimate_until=a.estimate_until if _estimated(a) else None,
            ),
        ],
        a.epochs,
    ),
    "Co-teaching": lambda a, s: (_coteaching(a, plus=False), _dynamics(a), a.epochs),
    "Co-teaching+": lambda a, s: (_coteaching(a, plus=True), _dynamics(a), a.epochs),
    "Late Stopping": lambda a, s: (
        _classifier(a),
        [
            TrainingDynamics(),
            LateStopping(
                rate=late_stopping_rate(s.rate),
                rounds_per_k=(2, 1, 1),
                warmup_epochs=2,
                final_epochs=a.final_epochs,
                **_final_run(a),
            ),
        ],
        -1,
    ),
    # The losses (lightning_noise.losses), with their papers' CIFAR-10 settings.
    "Label smoothing": _loss_row(lambda: LabelSmoothingCrossEntropy(0.1)),
    "MaxSup": _loss_row(lambda: MaxSupLoss(0.1, alpha_end=0.2)),
    "GCE": _loss_row(lambda: GeneralizedCrossEntropy(q=0.7)),
    "SCE": _loss_row(lambda: SymmetricCrossEntropy(alpha=0.1, beta=1.0)),
    "NCE+RCE": _loss_row(lambda: NCEandRCE(alpha=1.0, beta=1.0)),
    "NCE+MAE": _loss_row(lambda: NCEandMAE(alpha=1.0, beta=1.0)),
    "ELR": _loss_row(lambda: ELRLoss(beta=0.7, lam=3.0)),
}


def _final_run(args: argparse.Namespace) -> dict[str, Any]:
    """Late Stopping's ``final_optimizer`` / ``final_scheduler`` from ``--final-lr`` and
    ``--final-milestones`` (none: the final run keeps the rounds' optimizer)."""
    if args.final_lr is None:
        return {}
    milestones = args.final_milestones
    return {
        "final_optimizer": lambda p: torch.optim.SGD(
            p, lr=args.final_lr, momentum=0.9, weight_decay=5e-4
        ),
        "final_scheduler": (
            (lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones, gamma=0.5))
            if milestones
            else None
        ),
    }


#: Rows run by default (the losses' rows on request: --methods).
DEFAULT_METHODS = ["CE", "SAM", "Small-loss", "Co-teaching", "Co-teaching+", "Late Stopping"]


def run(method: str, setting: NoiseSetting, seed: int, args: argparse.Namespace) -> dict:
    """Train one method on one noise setting with one seed."""
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(setting.noise, setting.rate, seed=seed),
        image_size=args.image_size,
        channels=args.channels,
        batch_size=args.batch_size,
        seed=seed,
    )
    model, callbacks, max_epochs = METHODS[method](args, setting)
    dm.setup("fit")
    tester = EpochTestAccuracy(dm.test_dataloader())
    estimates = EstimateHistory(model, callbacks)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[tester, estimates, *callbacks],
        default_root_dir=args.root,
    )
    trainer.fit(model, datamodule=dm)
    final = [a for a, f in zip(tester.accuracy, tester.final_run, strict=True) if f]
    result: dict[str, Any] = {
        "last": tester.accuracy[-1],
        "best": max(final),
        "final": final,  # test accuracy of each epoch of the final run (all epochs but LS's)
        "epochs": len(tester.accuracy),
        "f1": float("nan"),
    }
    for callback in callbacks:
        detection = getattr(callback, "detection", None)
        if isinstance(detection, dict) and setting.rate > 0:  # no noise: F1 is undefined
            result["f1"] = detection["f1"]
    # The noise-rate estimate each epoch started with (--forget-rate estimate), and the truth.
    result["true_rate"] = float(getattr(dm.train_dataset, "noise_rate", setting.rate))
    result["estimates"] = estimates.values
    result["estimate"] = estimates.values[-1] if estimates.values else float("nan")
    return result


class EstimateHistory(pl.Callback):
    """The noise-rate estimate of the run's method at the end of every training epoch."""

    def __init__(self, model: pl.LightningModule, callbacks: list) -> None:
        holders = [getattr(model, "noise_rate_estimate", None)]
        holders += [getattr(c, "estimate", None) for c in callbacks]
        self.holder = next((h for h in holders if h is not None), None)
        self.values: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.holder is not None:
            value = self.holder.value
            self.values.append(float("nan") if value is None else value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.pstdev(values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the fixed-length rows")
    parser.add_argument("--final-epochs", type=int, default=15, help="Late Stopping final run")
    parser.add_argument(
        "--final-lr",
        type=float,
        default=None,
        help="SGD learning rate of Late Stopping's final run (default: the rounds' --lr)",
    )
    parser.add_argument(
        "--final-milestones",
        type=int,
        nargs="*",
        default=[],
        help="epochs of Late Stopping's final run at which its LR halves (needs --final-lr)",
    )
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (all rows)")
    parser.add_argument("--rho", type=float, default=0.5, help="SAM radius")
    parser.add_argument(
        "--forget-rate",
        choices=["oracle", "estimate"],
        default="oracle",
        help="oracle: the true noise rate sets the forget rates and the audit's budget; "
        "estimate: estimated from each run's own losses (no oracle)",
    )
    parser.add_argument(
        "--estimate-until",
        type=int,
        default=None,
        help="with --forget-rate estimate: the last epoch whose losses the estimate is fitted "
        "on (default: the library's)",
    )
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks/robustness"))
    parser.add_argument("--no-record", action="store_true", help="do not append to results.csv")
    args = parser.parse_args(argv)
    if args.final_milestones and args.final_lr is None:
        parser.error("--final-milestones needs --final-lr (the final run's own optimizer)")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[dict]]]:
    args = parse_args(argv)
    results: dict[str, dict[str, list[dict]]] = {}
    start = time.perf_counter()
    for name in args.settings:
        setting = SETTINGS[name]
        results[name] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                t0 = time.perf_counter()
                result = run(method, setting, seed, args)
                results[name][method].append(result)
                estimate = ""
                if result["estimates"]:
                    trail = " ".join(f"{v:.2f}" for v in result["estimates"])
                    estimate = (
                        f" estimate {result['estimate']:.3f} (true {result['true_rate']:.3f}; "
                        f"by epoch: {trail})"
                    )
                print(
                    f"{name} seed {seed} {method}: last {result['last']:.3f} best "
                    f"{result['best']:.3f} F1 {result['f1']:.3f} epochs {result['epochs']} "
                    f"({time.perf_counter() - t0:.0f} s){estimate}",
                    flush=True,
                )

    print(f"\ndevice: {device_name()}; {time.perf_counter() - start:.0f} s in all")
    print(
        f"digits {args.image_size}px, {args.backbone}, SGD lr {args.lr}, {args.epochs} epochs "
        f"(Late Stopping: its rounds + {args.final_epochs}), seeds {args.seeds}; test accuracy "
        f"mean +- std over seeds; forget rates and audit budget: {args.forget_rate}"
    )
    header = f"{'noise':<9}{'method':<15}{'last':>15}{'best':>15}{'detect F1':>11}{'epochs':>8}"
    print(header)
    rows = []
    for name, by_method in results.items():
        for method, runs in by_method.items():
            last = _mean_std([r["last"] for r in runs])
            best = _mean_std([r["best"] for r in runs])
            f1 = _mean_std([r["f1"] for r in runs])
            epochs = statistics.mean(r["epochs"] for r in runs)
            f1_text = "-" if f1[0] != f1[0] else f"{f1[0]:.3f}"
            print(
                f"{name:<9}{method:<15}{last[0]:>8.3f} +-{last[1]:.3f}"
                f"{best[0]:>8.3f} +-{best[1]:.3f}{f1_text:>11}{epochs:>8.0f}"
            )
            case = f"{name}/{method}" + (" (estimated rate)" if _estimated(args) else "")
            rows += [
                (case, "last_acc_mean", last[0]),
                (case, "last_acc_std", last[1]),
                (case, "best_acc_mean", best[0]),
                (case, "best_acc_std", best[1]),
            ]
            if f1[0] == f1[0]:
                rows.append((case, "detection_f1_mean", f1[0]))
            estimate = _mean_std([r["estimate"] for r in runs])
            if estimate[0] == estimate[0]:
                true = statistics.mean(r["true_rate"] for r in runs)
                print(
                    f"{'':<24}noise-rate estimate {estimate[0]:.3f} +-{estimate[1]:.3f} "
                    f"(true {true:.3f})"
                )
                rows += [
                    (case, "noise_rate_estimate_mean", estimate[0]),
                    (case, "noise_rate_true_mean", true),
                ]
    if not args.no_record:
        append_results("robustness", rows)
    return results


if __name__ == "__main__":
    main()
