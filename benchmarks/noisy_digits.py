"""Accuracy under label noise: each method vs plain training on digits, over several seeds.

Trains ImageClassifier (resnet10t) on the embedded digits with symmetric label noise,
plainly and with each method's callback, for the same number of epochs and seeds, and
prints the final-epoch test accuracy (mean and standard deviation over seeds) and the
difference to plain training. Seeds set the split, the noise and the initialisation.
Results are appended to ``benchmarks/results.csv``.

Run: ``python benchmarks/noisy_digits.py`` (``--help`` for sizes and ``--methods``).
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

from lightning_noise.callbacks import ASAM, FSAM, SAM, GradientNoise
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.models import ImageClassifier

#: method name -> callbacks factory (given the parsed arguments). Later methods add theirs.
METHODS: dict[str, Callable[[argparse.Namespace], list[pl.Callback]]] = {
    "plain": lambda a: [],
    "GradientNoise": lambda a: [GradientNoise(eta=a.eta)],
    "SAM": lambda a: [SAM(rho=a.rho)],
    "ASAM": lambda a: [ASAM(rho=a.asam_rho)],
    "FSAM": lambda a: [FSAM(rho=a.rho, mask_interval=10)],
}


def make_optimizer(args: argparse.Namespace) -> Callable:
    if args.optimizer == "sgd":
        return lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    return lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4)


def run(method: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Train one method with one seed; return final test accuracy and memorisation."""
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise("symmetric", args.noise_rate, seed=seed),
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=seed,
    )
    model = ImageClassifier(
        args.backbone,
        num_classes=dm.num_classes,
        in_chans=dm.in_chans,
        optimizer=make_optimizer(args),
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=METHODS[method](args),
        default_root_dir=args.root,
    )
    trainer.fit(model, datamodule=dm)
    memorised = float(trainer.callback_metrics["train/acc_noisy_labels"])
    (test,) = trainer.test(model, datamodule=dm, verbose=False)
    return {"test_acc": float(test["test/acc"]), "noisy_memorised": memorised}


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.5, help="SAM and FSAM radius")
    parser.add_argument("--asam-rho", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=0.01, help="GradientNoise eta")
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--no-record", action="store_true", help="do not append to results.csv")
    args = parser.parse_args(argv)
    methods = ["plain", *[m for m in args.methods if m != "plain"]]

    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    start = time.perf_counter()
    for seed in args.seeds:
        for method in methods:
            results[method].append(run(method, seed, args))
            print(f"seed {seed} {method}: {results[method][-1]}", flush=True)
    base = statistics.mean(r["test_acc"] for r in results["plain"])
    print(f"device: {device_name()}; {time.perf_counter() - start:.0f} s in all")
    print(
        f"digits {args.image_size}px, {args.noise_rate:.0%} symmetric noise, {args.backbone}, "
        f"{args.epochs} epochs, {args.optimizer} lr {args.lr}, SAM/FSAM rho {args.rho}, ASAM "
        f"rho {args.asam_rho}, seeds {args.seeds}; final-epoch test accuracy"
    )
    print(f"{'method':<16}{'mean':>8}{'std':>8}{'vs plain':>10}{'noisy memorised':>17}")
    rows = []
    for method in methods:
        accs = [r["test_acc"] for r in results[method]]
        mem = statistics.mean(r["noisy_memorised"] for r in results[method])
        mean, std = statistics.mean(accs), statistics.pstdev(accs)
        print(f"{method:<16}{mean:>8.3f}{std:>8.3f}{mean - base:>+10.3f}{mem:>17.3f}")
        rows += [(method, "test_acc_mean", mean), (method, "test_acc_std", std)]
    if not args.no_record:
        append_results("noisy_digits", rows)
    return results


if __name__ == "__main__":
    main()
