"""W&B sweep definitions and ``lightning-noise sweep`` (offline, W&B's sweep engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_noise.cli import LightningNoiseCLI, build_cli, main
from lightning_noise.loggers import SUMMARY_FILE
from lightning_noise.sweep import expand_command, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


class ParseOnly(LightningNoiseCLI):
    def instantiate_classes(self) -> None:
        pass


def _value(config, key: str):
    """The parsed value at a sweep parameter's dotted key (a callbacks key means the last
    callback, as jsonargparse applies it)."""
    node = config
    for part in key.split("."):
        if isinstance(node, list):
            node = node[-1]["init_args"] if part != "init_args" else node
        node = node[part]
    return node


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_definitions_propose_runs_the_cli_accepts(path, monkeypatch) -> None:
    import sweeps

    monkeypatch.chdir(ROOT)  # the commands' paths are relative to the repository
    config = load_sweep(path)
    assert config["metric"]["name"] == "val/acc"
    assert config["command"][-1] == "${args}" and config["command"][1] == "fit"
    proposal = sweeps.next_run(config, [], validate=True)
    params = {k: v["value"] for k, v in proposal.config.items()}
    command = expand_command(config, params)
    assert command[0] == "lightning-noise" and command[1] == "fit"
    cli = build_cli(command[2:], run=False, cli_class=ParseOnly)  # run=False: no subcommand
    parsed = cli.config.as_dict()
    for key, value in params.items():
        assert _value(parsed, key) == pytest.approx(value), key


def test_expand_command_macros() -> None:
    command = ["${env}", "${interpreter}", "${program}", "${args}"]
    config = {"program": "train.py", "command": command}
    line = expand_command(config, {"a.b": 0.1, "c": "x"})
    assert line[0] == "/usr/bin/env" and line[2:] == ["train.py", "--a.b=0.1", "--c=x"]
    no_hyphens = expand_command({"command": ["p", "${args_no_hyphens}"]}, {"a": 1})
    assert no_hyphens == ["p", "a=1"]
    assert json.loads(expand_command({"command": ["${args_json}"]}, {"a": 1})[0]) == {"a": 1}
    with pytest.raises(ValueError, match="does not support"):
        expand_command({"command": ["${project}"]}, {})
    with pytest.raises(ValueError, match="no `program`"):
        expand_command({"command": ["${program}"]}, {})


def test_invalid_sweep_fails_clearly(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": {"x": {"valuez": [1]}}}))
    with pytest.raises(ValueError, match="not a valid W&B sweep definition"):
        load_sweep(bad)


def test_sweep_runs_two_trials_offline_with_their_metrics(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = {
        "program": "lightning-noise",
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"trainer.callbacks.rho": {"values": [0.05, 0.5]}},
        "command": [
            "lightning-noise",
            "fit",
            "--config",
            str(ROOT / "recipes" / "digits_sam.yaml"),
            "--config",
            str(ROOT / "configs" / "loggers" / "wandb.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=test_resnet",
            "--data.init_args.image_size=8",
            "${args}",
        ],
    }
    path = tmp_path / "sam_test.yaml"
    path.write_text(yaml.safe_dump(sweep))
    main(["sweep", str(path), "--count", "3", "--out", str(tmp_path / "out")])
    records = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["params"] for r in records] == [
        {"trainer.callbacks.rho": 0.05},
        {"trainer.callbacks.rho": 0.5},
    ]  # the grid holds two runs: a third is not proposed
    assert all(r["state"] == "finished" for r in records)
    assert all(0.0 <= r["objective"] <= 1.0 for r in records)
    run_dirs = sorted((tmp_path / "runs" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    for run_dir, record in zip(run_dirs, records, strict=True):
        (binary,) = run_dir.glob("*.wandb")
        assert binary.stat().st_size > 0
        summary = json.loads((run_dir / "files" / SUMMARY_FILE).read_text())
        assert summary["val/acc"] == pytest.approx(record["objective"])
        assert "sam/grad_norm" in summary  # the method's own figures are logged too


def test_wandb_logger_goes_offline_without_credentials_and_says_so(tmp_path, monkeypatch):
    from lightning_noise.loggers import WandbLogger

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(save_dir=str(tmp_path), project="t")
    assert logger._offline and "no W&B credentials" in logger.offline_reason
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not WandbLogger(save_dir=str(tmp_path), project="t")._offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=str(tmp_path), project="t").offline_reason == "WANDB_MODE=offline"


def test_label_audit_reaches_wandb_as_a_table_and_an_image(tmp_path, monkeypatch) -> None:
    import lightning.pytorch as pl

    from lightning_noise.callbacks import LabelAudit
    from lightning_noise.data import DigitsDataModule, LabelNoise
    from lightning_noise.dynamics import TrainingDynamics
    from lightning_noise.loggers import WandbLogger
    from lightning_noise.models import ImageClassifier

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(save_dir=str(tmp_path), project="t", offline=True)
    audit = LabelAudit(score="aum", output_dir=str(tmp_path / "audit"))
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=logger,
        callbacks=[TrainingDynamics(), audit],
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4), image_size=8, channels=1, batch_size=64)
    trainer.fit(ImageClassifier("test_resnet", num_classes=10, in_chans=1), datamodule=dm)
    media = logger.run_dir / "files" / "media"
    (image,) = (media / "images").rglob("*.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (table,) = (media / "table").rglob("*.table.json")
    header = Path(audit.csv_path).read_text().splitlines()[0].split(",")
    assert json.loads(table.read_text())["columns"] == header
    summary = json.loads((logger.run_dir / "files" / SUMMARY_FILE).read_text())
    assert "label_audit/aum/f1" in summary
