"""Cost of the TrainingDynamics callback relative to plain training.

Trains the same ImageClassifier on digits with and without ``TrainingDynamics``, in
ABBA order so that drift and machine noise hit both alike, and prints the ratio of median
fit times (goal: under 1.05x). Because end-to-end timings on a shared CPU are noisy, it also
prints the time spent inside the callback's own hooks as a fraction of the fit time, measured
in the same runs. Results are appended to ``benchmarks/results.csv``.

Run: ``python benchmarks/overhead.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from common import append_results, device_name

from lightning_noise.data import DigitsDataModule
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.models import ImageClassifier


class TimedDynamics(TrainingDynamics):
    """TrainingDynamics that accumulates the wall time spent in its hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def on_train_batch_end(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def on_train_epoch_start(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_train_epoch_start(*args, **kwargs)
        self.seconds += time.perf_counter() - start


def fit_seconds(with_dynamics: bool, args: argparse.Namespace, root: Path) -> tuple[float, float]:
    """Fit once; return (fit seconds, seconds inside the dynamics callback's hooks)."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise_rate=0.4, batch_size=args.batch_size, image_size=args.image_size, seed=0
    )
    model = ImageClassifier(args.backbone, num_classes=dm.num_classes, in_chans=dm.in_chans)
    callbacks = [TimedDynamics(k=3)] if with_dynamics else []
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )
    dm.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, (callbacks[0].seconds if callbacks else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--no-record", action="store_true", help="do not append to results.csv")
    args = parser.parse_args()

    fit_seconds(False, args, args.root)  # warm-up: imports, allocator, first-call overheads
    plain, dyn, hook_fraction = [], [], []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)  # ABBA
        for with_dynamics in order:
            seconds, in_hooks = fit_seconds(with_dynamics, args, args.root)
            if with_dynamics:
                dyn.append(seconds)
                hook_fraction.append(in_hooks / seconds)
            else:
                plain.append(seconds)
    p, d = statistics.median(plain), statistics.median(dyn)
    ratio = d / p
    hooks = statistics.median(hook_fraction)
    print(f"device: {device_name()}")
    print(
        f"backbone {args.backbone}, {args.epochs} epochs x {args.repeats} repeats, digits "
        f"({args.image_size}px, batch {args.batch_size})"
    )
    print(f"{'case':<22}{'median fit s':>14}")
    print(f"{'plain':<22}{p:>14.3f}")
    print(f"{'+ TrainingDynamics':<22}{d:>14.3f}")
    print(f"ratio (dynamics / plain): {ratio:.3f}x  (goal < 1.05x)")
    print(
        f"time inside the callback's hooks: {100 * hooks:.2f}% of fit time (i.e. {1 + hooks:.4f}x)"
    )
    if not args.no_record:
        append_results(
            "overhead",
            [
                (f"{args.backbone}/plain", "median_fit_s", p),
                (f"{args.backbone}/dynamics", "median_fit_s", d),
                (args.backbone, "ratio", ratio),
                (args.backbone, "hook_fraction", hooks),
            ],
        )


if __name__ == "__main__":
    main()
