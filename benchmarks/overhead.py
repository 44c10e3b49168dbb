"""Cost of each training method relative to plain training, measured in one run.

Trains the same ImageClassifier on digits plainly and with each method's callback
(TrainingDynamics, GradientNoise, SAM, FSAM, ...), rotating the order of the cases every
repeat so that drift and machine noise hit all alike, and prints each case's median time per
optimizer step as a ratio to plain training. Goals: TrainingDynamics and GradientNoise under
1.05x; SAM under 2.1x (two passes make 2.0x the floor); FSAM under 2.2x.

Because end-to-end timings on a shared CPU are noisy, it also prints the time spent inside
the TrainingDynamics callback's own hooks as a fraction of its fit time, measured in the same
runs. Results are appended to ``benchmarks/results.csv``.

Run: ``python benchmarks/overhead.py`` (``--help`` for sizes and ``--cases``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from common import append_results, device_name

from lightning_noise.callbacks import FSAM, SAM, GradientNoise
from lightning_noise.data import DigitsDataModule, LabelNoise
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


#: case name -> (callbacks factory, goal ratio or None).
CASES: dict[str, tuple[Callable[[], list[pl.Callback]], float | None]] = {
    "plain": (lambda: [], None),
    "TrainingDynamics": (lambda: [TimedDynamics(k=3)], 1.05),
    "GradientNoise": (lambda: [GradientNoise()], 1.05),
    "SAM": (lambda: [SAM(rho=0.05)], 2.1),
    "FSAM": (lambda: [FSAM(rho=0.05, mask_interval=10)], 2.2),
}


def fit_seconds(case: str, args: argparse.Namespace) -> tuple[float, int, float]:
    """Fit once; return (fit seconds, optimizer steps, seconds inside TimedDynamics hooks)."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=0.4), batch_size=args.batch_size, image_size=args.image_size, seed=0
    )
    model = ImageClassifier(args.backbone, num_classes=dm.num_classes, in_chans=dm.in_chans)
    callbacks = CASES[case][0]()
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
        default_root_dir=args.root,
    )
    dm.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    in_hooks = sum(cb.seconds for cb in callbacks if isinstance(cb, TimedDynamics))
    return elapsed, trainer.global_step, in_hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--no-record", action="store_true", help="do not append to results.csv")
    args = parser.parse_args()
    cases = ["plain", *[c for c in args.cases if c != "plain"]]

    fit_seconds("plain", args)  # warm-up: imports, allocator, first-call overheads
    per_step: dict[str, list[float]] = {c: [] for c in cases}
    hook_fraction: list[float] = []
    for repeat in range(args.repeats):
        shift = repeat % len(cases)
        for case in cases[shift:] + cases[:shift]:  # rotate the order every repeat
            seconds, steps, in_hooks = fit_seconds(case, args)
            per_step[case].append(seconds / steps)
            if case == "TrainingDynamics":
                hook_fraction.append(in_hooks / seconds)

    plain = statistics.median(per_step["plain"])
    print(f"device: {device_name()}")
    print(
        f"backbone {args.backbone}, digits {args.image_size}px, batch {args.batch_size}, "
        f"{args.epochs} epochs x {args.repeats} repeats (rotating order)"
    )
    print(f"{'case':<18}{'ms/step':>10}{'ratio':>9}{'goal':>8}")
    rows = []
    for case in cases:
        ms = 1000 * statistics.median(per_step[case])
        ratio = ms / (1000 * plain)
        goal = CASES[case][1]
        print(f"{case:<18}{ms:>10.1f}{ratio:>8.3f}x{'' if goal is None else f'{goal:>7.2f}x'}")
        rows += [(f"{args.backbone}/{case}", "ms_per_step", ms), (case, "ratio", ratio)]
    if hook_fraction:
        hooks = statistics.median(hook_fraction)
        print(f"time inside TrainingDynamics' hooks: {100 * hooks:.2f}% of its fit time")
        rows.append(("TrainingDynamics", "hook_fraction", hooks))
    if not args.no_record:
        append_results("overhead", rows)


if __name__ == "__main__":
    main()
