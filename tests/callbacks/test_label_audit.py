"""Tests for the ``LabelAudit`` callback: the report, detection on noisy digits, errors, DDP.

One module-scoped fit (digits with 40% symmetric noise, 8 px, ``test_resnet``, 10 epochs)
carries four audits, one per score. The DDP test runs this file as a script
(``python test_label_audit.py OUT_DIR``) with ``strategy="ddp"`` on two CPU processes.
"""

from __future__ import annotations

import csv
import doctest
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from _trainers import ddp_trainer, make_trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, Subset

import lightning_noise.callbacks.label_audit as label_audit_module
from lightning_noise.callbacks.label_audit import (
    SCORES,
    LabelAudit,
    rank_samples,
    suspicion_scores,
    threshold_flags,
)
from lightning_noise.data import (
    DigitsDataModule,
    LabelNoise,
    ThresholdSamples,
    threshold_sample_mask,
)
from lightning_noise.dynamics import DynamicsStore, TrainingDynamics
from lightning_noise.models import ImageClassifier

NOISE_RATE = 0.4
BASE_COLUMNS = ["rank", "index", "given_label", "predicted_label", "score"]
STATISTIC = {
    "aum": "aum",
    "forgetting": "forgetting_events",
    "loss": "last_loss",
    "first_learned": "first_learned_epoch",
}
# Measured precision at the realised noise fraction on this setup (seeds 0-2, 10 epochs):
# aum 0.90-0.91, first_learned 0.89-0.91, loss 0.80-0.83, forgetting 0.74-0.80; random
# flagging expects the noise rate, 0.40. The margins leave room for other platforms.
MIN_PRECISION_GAIN = {"aum": 0.3, "first_learned": 0.3, "loss": 0.2, "forgetting": 0.15}


def digits(seed: int = 0) -> DigitsDataModule:
    return DigitsDataModule(
        noise=LabelNoise(rate=NOISE_RATE, seed=seed),
        image_size=8,
        channels=1,
        batch_size=64,
        seed=seed,
    )


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def model_predictions(model: ImageClassifier, dataset: Dataset) -> tuple[torch.Tensor, ...]:
    """The oracle: the final model's arg-max over the dataset, in eval mode."""
    loader = DataLoader(dataset, batch_size=500)
    model.eval()
    with torch.no_grad():
        rows = [(index, model(x).argmax(1)) for x, _, index in loader]
    index = torch.cat([r[0] for r in rows])
    predicted = torch.empty_like(index)
    predicted[index] = torch.cat([r[1] for r in rows])
    return predicted


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("audit")
    pl.seed_everything(0, verbose=False)
    dm = digits()
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    dynamics = TrainingDynamics()
    audits = {
        "aum": LabelAudit("aum"),
        "forgetting": LabelAudit("forgetting", output_dir=str(root / "custom")),
        "loss": LabelAudit("loss", top_k=50),
        "first_learned": LabelAudit("first_learned", flag_fraction=0.25),
    }
    trainer = make_trainer(
        root,
        [dynamics, *audits.values()],
        max_epochs=10,
        logger=CSVLogger(root),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    return SimpleNamespace(
        root=root, dm=dm, model=model, dynamics=dynamics, audits=audits, trainer=trainer
    )


# ----------------------------------------------------------------------------- the report
def test_csv_report_is_complete_and_sorted(audited) -> None:
    audit, dm = audited.audits["aum"], audited.dm
    columns, rows = read_csv(audit.csv_path)
    assert columns == [*BASE_COLUMNS, "aum", "flagged", "is_noisy", "clean_label"]
    n = len(dm.train_dataset)
    assert len(rows) == n
    assert [int(r["rank"]) for r in rows] == list(range(n))
    index = torch.tensor([int(r["index"]) for r in rows])
    assert sorted(index.tolist()) == list(range(n))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([int(r[name]) for r in rows])

    assert torch.equal(column("given_label"), dm.noisy_targets[index])
    assert torch.equal(column("is_noisy").bool(), dm.noise_mask[index])
    assert torch.equal(column("clean_label"), dm.clean_targets[index])
    aum = torch.tensor([float(r["aum"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(aum, audited.dynamics.store.aum()[index])
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), -aum)
    # The flagged rows are the top of the ranking, as many as the realised noise fraction.
    flagged = [int(r["flagged"]) for r in rows]
    num_noisy = int(dm.noise_mask.sum())
    assert flagged == [1] * num_noisy + [0] * (n - num_noisy)
    assert audit.detection["flag_fraction"] == pytest.approx(num_noisy / n)


def test_predicted_labels_are_the_final_models(audited) -> None:
    expected = model_predictions(audited.model, audited.dm.train_dataset)
    for audit in audited.audits.values():
        assert torch.equal(audit.predicted_labels, expected)
        assert torch.equal(audit.given_labels, audited.dm.noisy_targets)
    _, rows = read_csv(audited.audits["aum"].csv_path)
    index = torch.tensor([int(r["index"]) for r in rows])
    predicted = torch.tensor([int(r["predicted_label"]) for r in rows])
    assert torch.equal(predicted, expected[index])
    # The model fits some noisy labels and predicts the true class of others: the predicted
    # label is neither always the given nor always the clean one.
    assert 0 < int((expected != audited.dm.noisy_targets).sum()) < len(expected)


def test_training_mode_is_restored(audited) -> None:
    # on_train_end ran the inference pass in eval mode; Lightning's own teardown runs after.
    # A direct call shows the callback gives the module back in the mode it found it.
    model = audited.model
    model.train()
    audited.audits["aum"]._predict(audited.trainer, model, audited.dm.train_dataset, 1168)
    assert model.training


@pytest.mark.parametrize("score", SCORES)
def test_every_score_beats_random_flagging(audited, score) -> None:
    detection = audited.audits[score].detection
    assert detection is not None
    # Random flagging of any fraction has expected precision = the noise rate.
    noise_rate = float(audited.dm.noise_mask.float().mean())
    assert detection["precision"] >= noise_rate + MIN_PRECISION_GAIN[score], detection
    assert detection["f1"] > noise_rate, detection


def test_detection_agrees_with_the_csv(audited) -> None:
    audit = audited.audits["first_learned"]
    _, rows = read_csv(audit.csv_path)
    flagged = [r for r in rows if r["flagged"] == "1"]
    assert len(flagged) == round(0.25 * len(rows))
    precision = sum(int(r["is_noisy"]) for r in flagged) / len(flagged)
    recall = sum(int(r["is_noisy"]) for r in flagged) / sum(int(r["is_noisy"]) for r in rows)
    assert audit.detection["precision"] == pytest.approx(precision, abs=1e-6)
    assert audit.detection["recall"] == pytest.approx(recall, abs=1e-6)
    assert audit.detection["flag_fraction"] == pytest.approx(0.25, abs=1e-3)
    # "Never learned" is the most suspicious: score inf, statistic -1, ranked first.
    never = [r for r in rows if r["first_learned_epoch"] == "-1"]
    assert never and all(math.isinf(float(r["score"])) for r in never)
    assert rows[: len(never)] == never


def test_forgetting_ranks_never_learned_first(audited) -> None:
    audit = audited.audits["forgetting"]
    assert Path(audit.csv_path).parent == audited.root / "custom"
    _, rows = read_csv(audit.csv_path)
    store = audited.dynamics.store
    never_learned = int((~store.ever_learned()).sum())
    assert never_learned > 0
    assert all(math.isinf(float(r["score"])) for r in rows[:never_learned])
    finite = [float(r["score"]) for r in rows[never_learned:]]
    assert finite == sorted(finite, reverse=True)
    assert finite == [float(r["forgetting_events"]) for r in rows[never_learned:]]


def test_top_k_writes_only_the_most_suspicious(audited) -> None:
    audit = audited.audits["loss"]
    columns, rows = read_csv(audit.csv_path)
    assert "last_loss" in columns
    assert len(rows) == 50
    assert [int(r["index"]) for r in rows] == audit.ranking[:50].tolist()
    expected_loss = audited.dynamics.store.last_loss.double()[audit.ranking[:50]]
    assert [float(r["score"]) for r in rows] == pytest.approx(expected_loss.tolist())


def test_plots_are_written(audited) -> None:
    for audit in audited.audits.values():
        data = Path(audit.plot_path).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_default_output_dir_and_logged_metrics(audited) -> None:
    log_dir = Path(audited.trainer.log_dir)
    assert Path(audited.audits["aum"].csv_path) == log_dir / "label_audit" / "label_audit_aum.csv"
    _, rows = read_csv(log_dir / "metrics.csv")
    logged = {key: float(value) for row in rows for key, value in row.items() if value}
    for score, audit in audited.audits.items():
        for key in ("precision", "recall", "f1"):
            assert logged[f"label_audit/{score}/{key}"] == pytest.approx(audit.detection[key])


# ------------------------------------------------------------------ no mask, Subset, errors
class WithoutNoiseMask(Dataset):
    """The same samples with no ``noise_mask``: a training set of unknown noise."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def test_unknown_noise_and_a_subset(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    full = WithoutNoiseMask(digits().train_dataset)
    kept = list(range(0, len(full), 3))
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    audit = LabelAudit("aum", output_dir=str(tmp_path / "out"))
    trainer = make_trainer(tmp_path, [TrainingDynamics(), audit], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, DataLoader(Subset(full, kept), batch_size=64, shuffle=True))

    assert audit.detection is None
    columns, rows = read_csv(audit.csv_path)
    assert columns == [*BASE_COLUMNS, "aum", "flagged"]
    # Only the samples that were trained on have a score; the subset indexes the full set.
    assert sorted(int(r["index"]) for r in rows) == kept
    assert torch.isnan(audit.scores[1]) and not torch.isnan(audit.scores[0])
    assert sum(int(r["flagged"]) for r in rows) == round(0.1 * len(kept))
    # Predictions cover the full training set behind the Subset.
    assert bool((audit.predicted_labels >= 0).all())
    assert Path(audit.plot_path).read_bytes().startswith(b"\x89PNG")


def test_missing_training_dynamics_fails_before_training(tmp_path) -> None:
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    trainer = make_trainer(tmp_path, [LabelAudit()])
    with pytest.raises(RuntimeError, match=r"no TrainingDynamics callback.*TrainingDynamics\(\)"):
        trainer.fit(model, datamodule=digits())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score": "margin"}, "score must be one of"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1, got 0"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"flag_fraction": 0.0}, r"flag_fraction must be None, 'estimate' or in \(0, 1\], got 0.0"),
        ({"flag_fraction": 1.5}, "1.5"),
        ({"flag_fraction": "0.1"}, "flag_fraction"),
        ({"output_dir": 3}, "output_dir must be None or a path, got 3"),
        ({"threshold": "99"}, "threshold must be one of"),
        ({"score": "loss", "threshold": "auto"}, "needs score='aum'"),
        ({"threshold": "auto", "flag_fraction": 0.3}, "leave flag_fraction=None"),
        ({"threshold": "auto", "threshold_percentile": 100}, "threshold_percentile"),
    ],
)
def test_bad_arguments_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LabelAudit(**kwargs)


def test_state_dict_holds_the_hyperparameters(tmp_path) -> None:
    audit = LabelAudit("loss", top_k=5, output_dir=str(tmp_path), flag_fraction=0.2)
    path = tmp_path / "state.pt"
    torch.save(audit.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state == {
        "score": "loss",
        "top_k": 5,
        "output_dir": str(tmp_path),
        "flag_fraction": 0.2,
        "threshold": None,
        "threshold_percentile": 99.0,
    }
    audit.load_state_dict(state)  # nothing to restore
    keys = {
        LabelAudit("aum").state_key,
        LabelAudit("loss").state_key,
        LabelAudit("aum", top_k=5).state_key,
        LabelAudit("aum", output_dir=str(tmp_path)).state_key,
        LabelAudit("aum", threshold="auto").state_key,
    }
    assert len(keys) == 5  # two audits of one score can share a Trainer


# -------------------------------------------------------------------- trainer-free core
def handmade_store() -> DynamicsStore:
    """Five samples, four epochs; sample 4 is never seen."""
    store = DynamicsStore(5)
    history = [  # correct (1) / wrong (0) per epoch for samples 0-3
        [1, 1, 1, 1],  # learned at once, never forgotten
        [1, 0, 1, 0],  # forgotten twice
        [0, 0, 0, 0],  # never learned
        [0, 0, 1, 1],  # learned late
    ]
    index = torch.arange(4)
    for epoch in range(4):
        correct = torch.tensor([row[epoch] for row in history]).bool()
        margin = torch.where(correct, 1.0, -1.0) * (index + 1)
        loss = torch.tensor([0.1, 0.1, 0.1, 0.1])  # ties everywhere: the index decides
        store.record(index, correct, loss, margin, epoch)
    return store


def test_suspicion_scores_follow_the_papers() -> None:
    store = handmade_store()
    nan, inf = math.nan, math.inf
    # AUM: mean margin (low is suspicious) -> minus the AUM.
    torch.testing.assert_close(
        suspicion_scores(store, "aum"),
        torch.tensor([-1.0, 0.0, 3.0, 0.0, nan], dtype=torch.float64),
        equal_nan=True,
    )
    # Forgetting: never learned counts as infinitely forgotten (Toneva et al. 2019).
    torch.testing.assert_close(
        suspicion_scores(store, "forgetting"),
        torch.tensor([0.0, 2.0, inf, 0.0, nan], dtype=torch.float64),
        equal_nan=True,
    )
    torch.testing.assert_close(
        suspicion_scores(store, "first_learned", k=2),
        torch.tensor([0.0, inf, inf, 2.0, nan], dtype=torch.float64),
        equal_nan=True,
    )
    torch.testing.assert_close(
        suspicion_scores(store, "loss"),
        torch.tensor([0.1, 0.1, 0.1, 0.1, nan], dtype=torch.float64),
        equal_nan=True,
    )
    with pytest.raises(ValueError, match="score must be one of"):
        suspicion_scores(store, "nope")


def test_rank_samples_breaks_ties_by_the_secondary_key_then_the_index() -> None:
    store = handmade_store()
    forgetting = suspicion_scores(store, "forgetting")
    assert rank_samples(forgetting).tolist() == [2, 1, 0, 3]  # unseen sample 4 left out
    tie_break = torch.tensor([0.0, 0.0, 0.0, 5.0, 9.0])
    assert rank_samples(forgetting, tie_break).tolist() == [2, 1, 3, 0]
    nan_tie = torch.tensor([math.nan, 0.0, 0.0, 0.0, 0.0])
    assert rank_samples(torch.zeros(4), nan_tie[:4]).tolist() == [1, 2, 3, 0]
    assert rank_samples(torch.full((3,), math.nan)).tolist() == []


def test_doctests() -> None:
    assert doctest.testmod(label_audit_module, raise_on_error=True).failed == 0


# ------------------------------------------------------------------------------------ DDP
def ddp_main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits()
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    audit = LabelAudit("aum", output_dir=str(Path(out_dir) / "audit"))
    trainer = ddp_trainer([TrainingDynamics(), audit], max_epochs=2)
    trainer.fit(model, datamodule=dm)
    result = {
        "ranking": audit.ranking,
        "scores": audit.scores,
        "given_labels": audit.given_labels,
        "predicted_labels": audit.predicted_labels,
        "flagged": audit.flagged,
        "detection": torch.tensor([audit.detection[k] for k in ("precision", "recall", "f1")]),
        # This rank's own prediction of every sample: on rank zero, the oracle.
        "oracle": model_predictions(model, dm.train_dataset),
    }
    torch.save(result, Path(out_dir) / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_agree_and_rank_zero_writes(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0].items():
        # The oracles may differ: BatchNorm buffers of rank 1 lag after the last step.
        assert key == "oracle" or torch.equal(value, ranks[1][key]), f"{key} differs"
    result, dm = ranks[0], digits()
    assert torch.equal(result["predicted_labels"], result["oracle"])  # rank zero's model
    assert torch.equal(result["given_labels"], dm.noisy_targets)
    _, rows = read_csv(tmp_path / "audit" / "label_audit_aum.csv")
    assert len(rows) == len(dm.train_dataset)
    assert [int(r["index"]) for r in rows] == result["ranking"].tolist()


if __name__ == "__main__":
    ddp_main(sys.argv[1])


# ------------------------------------------------------------ AUM's threshold samples
def test_threshold_flags_is_the_official_aum_wtr_rule() -> None:
    """``generate_aum_details`` of asappresearch/aum (examples/paper_replication/runner.py):
    AUM_WTR = mean over threshold samples of [AUM < AUM_t] > 0.01, transcribed."""
    g = torch.Generator().manual_seed(0)
    aum = torch.randn(3000, generator=g, dtype=torch.float64) * 2
    aum[::7] = aum[::7].round()  # ties with threshold samples
    is_threshold = threshold_sample_mask(3000, 10, seed=1)
    aum[is_threshold] -= 2.0  # the fake class is hard to learn
    aum_wtr = torch.lt(aum.view(-1, 1), aum[is_threshold].view(1, -1)).float().mean(dim=-1).gt(0.01)
    flags, cut = threshold_flags(aum, is_threshold)
    assert torch.equal(flags, aum_wtr & ~is_threshold)
    assert cut == pytest.approx(float(torch.quantile(aum[is_threshold], 0.99)))
    assert 0 < int(flags.sum()) < int((~is_threshold).sum())
    aum[5] = math.nan  # never seen: no verdict
    assert not threshold_flags(aum, is_threshold)[0][5]
    with pytest.raises(ValueError, match="no threshold sample"):
        threshold_flags(aum, torch.zeros(3000, dtype=torch.bool))


def test_threshold_samples_relabel_a_disjoint_slice_to_the_fake_class() -> None:
    n, c = 1000, 10
    first, second = (
        threshold_sample_mask(n, c, set_index=1),
        threshold_sample_mask(n, c, set_index=2),
    )
    assert int(first.sum()) == int(second.sum()) == n // (c + 1)  # the paper's N / (C + 1)
    assert not bool((first & second).any())
    assert torch.equal(first, threshold_sample_mask(n, c, set_index=1))  # seeded
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4), image_size=8, channels=1, threshold_samples=1)
    data = dm.train_dataset
    assert isinstance(data, ThresholdSamples) and dm.model_num_classes == 11
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    assert torch.equal(labels == 10, dm.threshold_mask)
    noisy = dm.noisy_targets  # the real noisy labels elsewhere; noise_mask describes them
    assert torch.equal(labels[~dm.threshold_mask], noisy[~dm.threshold_mask])
    assert dm.noise_mask.shape == (len(data),) and DigitsDataModule().model_num_classes == 10
    with pytest.raises(ValueError, match="does not fit"):
        threshold_sample_mask(10, 10)  # N // (C + 1) = 0


def test_auto_threshold_flags_noisy_digits_without_the_noise_rate(tmp_path) -> None:
    """Pleiss et al.'s procedure on digits, 40% symmetric noise: no noise rate is given."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(
        noise=LabelNoise(rate=NOISE_RATE, seed=0), image_size=8, channels=1, batch_size=64,
        seed=0, threshold_samples=1,
    )  # fmt: skip
    model = ImageClassifier("test_resnet", num_classes=dm.model_num_classes, in_chans=1)
    audit = LabelAudit("aum", threshold="auto", output_dir=str(tmp_path / "out"))
    trainer = make_trainer(
        tmp_path, [TrainingDynamics(), audit], max_epochs=10, limit_val_batches=0,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    mask = dm.threshold_mask
    # Threshold samples get no verdict; every other sample is ranked.
    assert torch.isnan(audit.scores[mask]).all() and not audit.flagged[mask].any()
    assert audit.ranking.numel() == int((~mask).sum())
    d = audit.detection
    # Random flagging expects precision = the noise rate (0.4) and recall = the flag fraction.
    assert d["precision"] > NOISE_RATE + 0.3, d
    assert d["recall"] > 0.6 and d["recall"] > d["flag_fraction"] + 0.2, d
    assert audit.aum_threshold is not None
    aum = trainer.callbacks[0].store.aum()
    assert torch.equal(audit.flagged, threshold_flags(aum, mask)[0])
    _, rows = read_csv(audit.csv_path)
    assert sum(int(r["flagged"]) for r in rows) == int(audit.flagged.sum())
    assert not torch.isnan(aum[~mask]).any()


def test_auto_threshold_without_threshold_samples_fails_before_training(tmp_path) -> None:
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    trainer = make_trainer(tmp_path, [TrainingDynamics(), LabelAudit(threshold="auto")])
    with pytest.raises(ValueError, match=r"threshold_samples=1 to the DataModule"):
        trainer.fit(model, datamodule=digits())
    assert trainer.global_step == 0


def test_auto_threshold_from_the_cli(tmp_path) -> None:
    """The digits label-audit recipe with threshold samples: the command gives the model the
    fake class's output (DataModule.model_num_classes) and the audit flags without a rate."""
    import yaml

    from lightning_noise.cli import build_cli

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "recipes" / "digits_label_audit.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("LabelAudit"):
            callback["init_args"].update(flag_fraction=None, threshold="auto")
    config["data"]["init_args"]["threshold_samples"] = 1
    path = tmp_path / "audit_auto.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(
        [
            "fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet", "--data.init_args.image_size=8",
        ]
    )  # fmt: skip
    audit = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LabelAudit))
    assert cli.model.hparams.num_classes == 11 and audit.threshold == "auto"
    assert audit.aum_threshold is not None and audit.detection is not None
    assert torch.equal(audit.threshold_mask, cli.datamodule.threshold_mask)
    assert Path(audit.csv_path).exists()
