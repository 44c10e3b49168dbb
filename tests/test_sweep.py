"""W&B sweep definitions and ``lightning-noise sweep`` (offline, W&B's sweep engine)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lightning_noise import sweep as sweep_module
from lightning_noise.cli import LightningNoiseCLI, build_cli, main
from lightning_noise.loggers import SUMMARY_FILE
from lightning_noise.sweep import expand_command, find_sweep, load_sweep

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


@pytest.mark.slow  # 21 s; tests/test_readme.py runs the README's sweep command in the default suite
def test_sweep_runs_two_trials_offline_with_their_metrics(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = {
        "program": "lightning-noise",
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"trainer.callbacks.rho": {"values": [0.05, 0.5]}},
        # Two runs only: hyperband stops neither (each band's threshold is the worse of the
        # two), but every run now writes its history for it.
        "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
        "command": [
            "lightning-noise",
            "fit",
            "--config",
            str(ROOT / "recipes" / "digits_sam.yaml"),
            "--config",
            str(ROOT / "configs" / "loggers" / "wandb.yaml"),
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
    # The override comes after the sweep's own arguments and reaches every run.
    main(
        [
            "sweep",
            str(path),
            "--count",
            "3",
            "--out",
            str(tmp_path / "out"),
            "--trainer.max_epochs=2",
        ]
    )
    records = json.loads((tmp_path / "out" / "sweep.json").read_text())
    for record in records:
        assert record["command"][-1] == "--trainer.max_epochs=2"
        lines = (tmp_path / "out" / record["run"] / "history.jsonl").read_text().splitlines()
        history = [json.loads(line) for line in lines]
        assert [h["epoch"] for h in history] == [0, 1]  # one entry per validation run
        assert history[-1]["val/acc"] == pytest.approx(record["objective"])
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


#: A stand-in training program: it logs ``score`` = x + 0.01 * epoch to the sweep's history
#: file once per "epoch", for 3 epochs when x >= 0.5 and 100 (10 s) otherwise, writes its
#: summary at the end, and records the SIGTERM the sweep sends when it stops it.
FAKE_PROGRAM = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    Path(os.environ["FAKE_ARGV_DIR"], f"{os.getpid()}.json").write_text(json.dumps(sys.argv[1:]))
    def stopped(signum, frame):
        Path(os.environ["FAKE_ARGV_DIR"], "sigterm").write_text(args["x"])
        sys.exit(143)
    signal.signal(signal.SIGTERM, stopped)
    x = float(args["x"])
    last = None
    for epoch in range(3 if x >= 0.5 else 100):
        last = {"score": x + 0.01 * epoch, "epoch": epoch}
        if not os.environ.get("FAKE_NO_HISTORY"):
            with open(os.environ["LIGHTNING_NOISE_HISTORY"], "a") as f:
                f.write(json.dumps(last) + "\\n")
        time.sleep(0.1)
    Path(os.environ["LIGHTNING_NOISE_SUMMARY"]).parent.mkdir(parents=True, exist_ok=True)
    Path(os.environ["LIGHTNING_NOISE_SUMMARY"]).write_text(json.dumps(last))
    """
)


def _fake_sweep(tmp_path, monkeypatch, **fields) -> Path:
    program = tmp_path / "train.py"
    program.write_text(FAKE_PROGRAM)
    monkeypatch.setenv("FAKE_ARGV_DIR", str(tmp_path))
    config = {
        "program": str(program),
        "method": "grid",
        "metric": {"name": "score", "goal": "maximize"},
        "parameters": {"x": {"values": [0.9, 0.5, 0.1]}},
        "command": [sys.executable, str(program), "${args}"],
        **fields,
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_hyperband_stops_the_run_the_sweep_engine_names(tmp_path, monkeypatch, capsys) -> None:
    import sweeps

    early = {"type": "hyperband", "min_iter": 1, "eta": 2}  # bands at 1, 2, 4, ... entries
    path = _fake_sweep(tmp_path, monkeypatch, early_terminate=early)
    records = sweep_module.main([str(path), "--count", "3", "--out", str(tmp_path / "out")])
    assert [r["state"] for r in records] == ["finished", "finished", "stopped"]
    # At its 2nd entry the third run (0.10, 0.11) is below band 1's threshold: the median of
    # the three runs' 2nd values (0.91, 0.51, 0.11) is 0.51.
    assert records[2]["stopped_at"] == 2
    assert (tmp_path / "sigterm").read_text() == "0.1"  # stopped by SIGTERM, as the agent does
    assert records[2]["history"] < 100 and records[2]["returncode"] == 143
    assert records[2]["objective"] == pytest.approx(0.1 + 0.01 * (records[2]["history"] - 1))
    out = capsys.readouterr().out
    assert "run fake-002 stopped early by hyperband after 2 score values" in out
    assert "best (maximize score): fake-000 x=0.9" in out

    # The oracle: the sweep engine's rule on the same histories stops the third run at its 2nd
    # entry and not at its 1st, and never stops the first two.
    def run(name, x, n, state):
        history = [{"score": x + 0.01 * e} for e in range(n)]
        # (history by its alias: this pydantic ignores the field name)
        return sweeps.SweepRun(name=name, state=state, sampledHistory=history)

    config = yaml.safe_load(path.read_text())
    done = [run("a", 0.9, 3, "finished"), run("b", 0.5, 3, "finished")]
    for n, stops in ((1, False), (2, True)):
        third = run("c", 0.1, n, "running")
        assert any(r is third for r in sweeps.stop_runs(config, [*done, third])) == stops
    for n in (2, 3):
        second = run("b", 0.5, n, "running")
        assert sweeps.stop_runs(config, [done[0], second]) == []


def test_overrides_reach_every_run_and_the_table_prints_plain_numbers(
    tmp_path, monkeypatch, capsys
) -> None:
    path = _fake_sweep(
        tmp_path,
        monkeypatch,
        method="random",
        parameters={"x": {"distribution": "uniform", "min": 0.5, "max": 1.0}},
    )
    records = sweep_module.main([str(path), "--count", "2", "--out", str(tmp_path / "o"), "--y=1"])
    argvs = [json.loads(p.read_text()) for p in tmp_path.glob("[0-9]*.json")]
    assert len(argvs) == 2
    for argv in argvs:
        assert argv[0].startswith("--x=") and argv[1:] == ["--y=1"]  # no history argument
    saved = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert [r["params"] for r in saved] == [r["params"] for r in records]
    assert all(type(r["params"]["x"]) is float and r["state"] == "finished" for r in records)
    out = capsys.readouterr().out
    assert "np." not in out and "float64" not in out
    assert f"x={records[0]['params']['x']:.4g}" in out
    with pytest.raises(SystemExit):
        sweep_module.main([str(path), "stray"])  # an override must be --key=value
    assert "overrides are --key=value" in capsys.readouterr().err


def test_a_run_without_history_is_not_stopped_and_the_sweep_says_so(
    tmp_path, monkeypatch, capsys
) -> None:
    path = _fake_sweep(
        tmp_path,
        monkeypatch,
        parameters={"x": {"values": [0.9]}},
        early_terminate={"type": "hyperband", "min_iter": 1},
    )
    monkeypatch.setenv("FAKE_NO_HISTORY", "1")
    (record,) = sweep_module.main([str(path), "--count", "1", "--out", str(tmp_path / "o")])
    assert record["state"] == "finished"
    assert "wrote no metric history" in capsys.readouterr().out


def test_find_sweep_by_name_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_sweep("sam_rho") == ROOT / "configs" / "sweeps" / "sam_rho.yaml"
    assert find_sweep("sam_rho.yaml").read_text() == find_sweep("sam_rho").read_text()
    with pytest.raises(SystemExit, match=r"no sweep file or sweep named 'sam_rhoo'.*sam_rho"):
        find_sweep("sam_rhoo")


def test_sweep_history_argument_and_file_names_match_the_cli() -> None:
    from lightning_noise import history, lightning_cli

    assert sweep_module.SUMMARY_ENV == lightning_cli.SUMMARY_ENV
    assert sweep_module.HISTORY_ARG.endswith("lightning_noise.history.MetricStream")
    assert history.HISTORY_ENV == sweep_module.HISTORY_ENV
    cmd = ["lightning-noise", "fit", "--config", "r.yaml"]
    assert sweep_module._history_arg(cmd) == [sweep_module.HISTORY_ARG]
    run = ["lightning-noise", "run", "digits_sam"]
    assert sweep_module._history_arg(run) == [sweep_module.HISTORY_ARG]
    assert sweep_module._history_arg(["lightning-noise", "test", "--config", "r.yaml"]) == []
    assert sweep_module._history_arg(["python", "train.py"]) == []
