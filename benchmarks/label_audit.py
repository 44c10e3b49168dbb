"""Label-noise detection: LabelAudit's four scores vs cleanlab's ``find_label_issues``.

Trains ImageClassifier on the embedded digits with synthetic label noise (40% symmetric by
default) with ``TrainingDynamics`` and one ``LabelAudit`` per score (aum, forgetting, loss,
first_learned), and measures how well each finds the corrupted labels of the training set:

* ``precision`` / ``recall`` / ``f1`` of the top-ranked samples at an **equal budget**: every
  ranking flags as many samples as there are noisy labels (the realised noise fraction; the
  audit's default when the noise mask is known). At this budget precision = recall = F1.
* ``average_precision``: the area under the precision-recall curve of the full ranking
  (scikit-learn's ``average_precision_score``), free of any budget.

cleanlab (Northcutt et al., JAIR 2021, "Confident Learning: Estimating Uncertainty in Dataset
Labels") needs predicted probabilities. Two variants are measured:

* ``cleanlab/cv<K>`` (what cleanlab prescribes): out-of-sample probabilities from K-fold
  cross-validation, a fresh model trained on K-1 folds (same backbone, optimizer and epochs)
  predicting the held-out fold.
* ``cleanlab/in_sample``: the final audited model's softmax on its own training set; free,
  but the model has partly memorised the noisy labels.

For each, ``find_label_issues(labels, pred_probs)`` (default ``filter_by="prune_by_noise_rate"``)
picks its own number of issues (rows ``.../own``: precision, recall, f1, flag_fraction), and
its self-confidence ranking (``get_label_quality_scores``) is scored at the equal budget.

cleanlab is not a dependency of lightning-noise. Install it in the benchmark environment
(``pip install cleanlab``), or point ``--cleanlab-path`` (or the ``CLEANLAB_PATH``
environment variable) at a folder installed with ``pip install --target DIR cleanlab``.
Without it the LabelAudit rows are still measured.

AUM with threshold samples (Pleiss et al. 2020; ``LabelAudit(score="aum", threshold="auto")``)
decides how many samples to flag without the noise rate. ``--threshold-sets K`` (default 2)
adds K more fits per seed, fit ``k`` with the DataModule's ``threshold_samples=k`` (a disjoint
set of N // (C + 1) samples relabelled to a fake 11th class, one more model output):

* ``LabelAudit/aum/threshold_set<k>``: that run's verdict on the samples it judges (all but
  its own threshold samples);
* ``LabelAudit/aum/threshold_<K>runs``: the official combination of the runs
  (``runner.py``'s ``aum_wtr``): a sample is flagged when every run that judged it flags it;
  scored over every sample.

``--threshold-only`` skips the four-score fit and cleanlab (the other rows).

Results are appended to ``benchmarks/results.csv``.

Run: ``python benchmarks/label_audit.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import numpy as np
import torch
from common import append_results, device_name
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_noise.callbacks.label_audit import SCORES, LabelAudit
from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.dynamics import TrainingDynamics
from lightning_noise.metrics import noise_detection_scores
from lightning_noise.models import ImageClassifier


def import_cleanlab(path: str | None) -> Any:
    """The ``cleanlab`` module, or None with a message saying how to install it."""
    if path:
        sys.path.insert(0, path)
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError as error:
        print(
            f"cleanlab is not available ({error}); the cleanlab rows are skipped. Install it "
            "in the benchmark environment with `pip install cleanlab`, or "
            "`pip install --target DIR cleanlab` and pass --cleanlab-path DIR",
            file=sys.stderr,
        )
        return None
    return cleanlab


def make_trainer(args: argparse.Namespace, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=args.root,
    )


def make_model(args: argparse.Namespace, num_classes: int = 10) -> ImageClassifier:
    if args.optimizer == "sgd":

        def optimizer(p: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    else:

        def optimizer(p: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4)

    return ImageClassifier(args.backbone, num_classes=num_classes, in_chans=1, optimizer=optimizer)


def softmax_by_index(model: ImageClassifier, dataset: Dataset, n: int) -> np.ndarray:
    """``[n, C]`` softmax of ``model`` (eval mode) on ``dataset``'s samples, by their index."""
    probs = np.zeros((n, 10), dtype=np.float64)
    model.eval()
    with torch.no_grad():
        for x, _, index in DataLoader(dataset, batch_size=256):
            out = model(x.to(model.device)).float().softmax(dim=1).cpu()
            probs[index.numpy()] = out.double().numpy()
    return probs


def cross_validated_probs(
    args: argparse.Namespace, dataset: Dataset, labels: np.ndarray, seed: int
) -> np.ndarray:
    """Out-of-sample ``[N, C]`` probabilities from K-fold cross-validation (cleanlab's way)."""
    n = len(labels)
    probs = np.zeros((n, 10), dtype=np.float64)
    folds = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=seed)
    for fold, (train_idx, held_out) in enumerate(folds.split(np.zeros(n), labels)):
        pl.seed_everything(seed * 100 + fold, verbose=False)
        model = make_model(args)
        generator = torch.Generator().manual_seed(seed * 100 + fold)
        loader = DataLoader(
            Subset(dataset, train_idx.tolist()),
            batch_size=args.batch_size,
            shuffle=True,
            generator=generator,
        )
        make_trainer(args, []).fit(model, loader)
        fold_probs = softmax_by_index(model, Subset(dataset, held_out.tolist()), n)
        probs[held_out] = fold_probs[held_out]
    return probs


def budget_detection(suspicion: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """Precision/recall/F1 of the top ``noisy.sum()`` samples, and average precision."""
    budget = int(noisy.sum())
    order = np.argsort(-suspicion, kind="stable")
    flagged = np.zeros_like(noisy)
    flagged[order[:budget]] = True
    result = noise_detection_scores(torch.from_numpy(flagged), torch.from_numpy(noisy))
    out = {key: float(value) for key, value in result.items()}
    out["average_precision"] = float(average_precision_score(noisy, suspicion))
    return out


def threshold_runs(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """AUM with threshold samples: one fit per set, and the runs combined as the official code."""
    results: dict[str, dict[str, float]] = {}
    judged_by = []  # (judged mask, flags) per run
    noisy = None
    for set_index in range(1, args.threshold_sets + 1):
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(
            noise=LabelNoise(args.noise, args.noise_rate, seed=seed),
            image_size=args.image_size,
            channels=1,
            batch_size=args.batch_size,
            seed=seed,
            threshold_samples=set_index,
        )
        model = make_model(args, num_classes=dm.model_num_classes)
        audit = LabelAudit(
            "aum", threshold="auto", output_dir=os.path.join(args.root, f"seed{seed}_t{set_index}")
        )
        make_trainer(args, [TrainingDynamics(k=args.k), audit]).fit(model, datamodule=dm)
        assert audit.detection is not None and audit.threshold_mask is not None
        figures = {k: audit.detection[k] for k in ("precision", "recall", "f1", "flag_fraction")}
        results[f"LabelAudit/aum/threshold_set{set_index}"] = figures
        judged_by.append((~audit.threshold_mask, audit.flagged.clone()))
        noisy = dm.noise_mask
    assert noisy is not None
    judged = torch.stack([j for j, _ in judged_by]).double()
    bad = torch.stack([(j & f) for j, f in judged_by]).double()
    # runner.py: good_probs = ceil(1 - bad / counts): removed only when every judging run flags.
    flags = (bad.sum(0) / judged.sum(0).clamp_min(1) >= 1.0) & (judged.sum(0) > 0)
    combined = noise_detection_scores(flags, noisy)
    results[f"LabelAudit/aum/threshold_{args.threshold_sets}runs"] = {
        **{k: float(v) for k, v in combined.items()},
        "flag_fraction": float(flags.double().mean()),
    }
    return results


def run_seed(args: argparse.Namespace, seed: int, cleanlab: Any) -> dict[str, dict[str, float]]:
    """All detection figures of one seed: ``{case: {metric: value}}``."""
    if args.threshold_only:
        return threshold_runs(args, seed)
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(args.noise, args.noise_rate, seed=seed),
        image_size=args.image_size,
        channels=1,
        batch_size=args.batch_size,
        seed=seed,
    )
    model = make_model(args)
    audits = [
        LabelAudit(score, output_dir=os.path.join(args.root, f"seed{seed}")) for score in SCORES
    ]
    start = time.perf_counter()
    trainer = make_trainer(args, [TrainingDynamics(k=args.k), *audits])
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - start
    noisy = dm.noise_mask.numpy()
    labels = dm.noisy_targets.numpy()
    results: dict[str, dict[str, float]] = {}
    for audit in audits:
        assert audit.scores is not None and audit.detection is not None
        suspicion = audit.scores.numpy().copy()
        # Budget-free AP needs finite scores: "never learned" (inf) goes just above the rest.
        finite = suspicion[np.isfinite(suspicion)]
        suspicion[np.isinf(suspicion)] = (finite.max() if finite.size else 0.0) + 1.0
        figures = {k: audit.detection[k] for k in ("precision", "recall", "f1")}
        figures["average_precision"] = float(average_precision_score(noisy, suspicion))
        results[f"LabelAudit/{audit.score}"] = figures
    results["LabelAudit/aum"]["fit_s"] = fit_s
    results["LabelAudit/aum"]["noisy_memorised"] = float(
        trainer.callback_metrics["train/acc_noisy_labels"]
    )
    if args.threshold_sets:
        results.update(threshold_runs(args, seed))
    if cleanlab is None:
        return results

    variants = {"in_sample": softmax_by_index(model, dm.train_dataset, len(labels))}
    if args.folds >= 2:
        start = time.perf_counter()
        variants[f"cv{args.folds}"] = cross_validated_probs(args, dm.train_dataset, labels, seed)
        results["LabelAudit/aum"]["cv_s"] = time.perf_counter() - start
    for name, probs in variants.items():
        quality = cleanlab.rank.get_label_quality_scores(labels, probs, method="self_confidence")
        results[f"cleanlab/{name}"] = budget_detection(-quality, noisy)
        issues = cleanlab.filter.find_label_issues(labels, probs)
        own = noise_detection_scores(torch.from_numpy(issues), torch.from_numpy(noisy))
        results[f"cleanlab/{name}/own"] = {k: float(v) for k, v in own.items()}
        results[f"cleanlab/{name}/own"]["flag_fraction"] = float(issues.mean())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", default="symmetric")
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=3, help="TrainingDynamics k (first_learned)")
    parser.add_argument("--folds", type=int, default=4, help="cleanlab CV folds; <2: none")
    parser.add_argument("--cleanlab-path", default=os.environ.get("CLEANLAB_PATH"))
    parser.add_argument(
        "--threshold-sets", type=int, default=2, help="AUM threshold-sample fits per seed"
    )
    parser.add_argument(
        "--threshold-only", action="store_true", help="only the threshold-sample rows"
    )
    parser.add_argument("--root", default="runs/benchmark_label_audit")
    parser.add_argument("--no-save", action="store_true", help="do not append results.csv")
    args = parser.parse_args()

    cleanlab = import_cleanlab(args.cleanlab_path)
    config = (
        f"digits-{args.noise}{args.noise_rate:g}/{args.backbone}-{args.image_size}px/"
        f"{args.optimizer}-{args.epochs}ep"
    )
    print(f"device: {device_name()}; {config}; seeds {args.seeds}", flush=True)
    per_case: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in args.seeds:
        for case, figures in run_seed(args, seed, cleanlab).items():
            for metric, value in figures.items():
                per_case[case][metric].append(value)
        print(f"seed {seed} done", flush=True)

    header = ("case", "precision", "recall", "f1", "avg_precision", "flag_fraction")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows: list[tuple[str, str, float]] = []
    for case, metrics in per_case.items():
        cells = [case]
        for metric in ("precision", "recall", "f1", "average_precision", "flag_fraction"):
            values = metrics.get(metric)
            if not values:
                cells.append("")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.3f} ± {std:.3f}")
        print("| " + " | ".join(cells) + " |")
        for metric, values in metrics.items():
            rows.append((f"{config}/{case}", metric, statistics.fmean(values)))
    timing = per_case["LabelAudit/aum"]
    if args.threshold_only:
        if not args.no_save:
            append_results("label_audit", rows)
        return
    print(f"\nfit {statistics.fmean(timing['fit_s']):.1f} s per seed", end="")
    if timing.get("cv_s"):
        print(
            f"; {args.folds}-fold CV for cleanlab {statistics.fmean(timing['cv_s']):.1f} s", end=""
        )
    print(f"; noisy labels memorised at the end: {statistics.fmean(timing['noisy_memorised']):.3f}")
    if not args.no_save:
        append_results("label_audit", rows)


if __name__ == "__main__":
    main()
