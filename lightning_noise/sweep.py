"""``lightning-noise sweep``: run a W&B sweep definition where there is no W&B server.

The sweep files under ``configs/sweeps/`` are W&B sweep definitions: online, ``wandb sweep
configs/sweeps/<name>.yaml`` then ``wandb agent <id>`` runs them. Offline,
``lightning-noise sweep configs/sweeps/<name>.yaml --count N`` runs the same definition here:

* W&B's own open-source sweep engine (the ``sweeps`` package, what the W&B backend and local
  controller use) proposes each run from the definition and the finished runs (grid, random,
  Bayesian search);
* each run is launched with exactly the command line the W&B agent would build: the file's
  ``command`` with ``${program}``, ``${interpreter}``, ``${env}``, ``${args}`` (``--key=value``
  per parameter), ``${args_no_hyphens}`` and ``${args_json}`` expanded;
* each run logs to W&B offline (``WANDB_MODE=offline``), so ``wandb sync`` can upload it;
* the objective (``metric.name``) is read from the run itself: the CLI writes its final
  metrics to the JSON file named by ``$LIGHTNING_NOISE_SUMMARY``, because an offline W&B run
  keeps its metrics only in its binary ``.wandb`` file.

With LightningCLI the parameters must come after the subcommand and the base config:
``command: [lightning-noise, fit, --config, recipes/<name>.yaml, ${args}]``. W&B's default
command (``${env} ${interpreter} ${program} ${args}``) puts them before the subcommand, and
``${args_no_hyphens}`` drops the ``--``; both fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lightning_noise.lightning_cli import SUMMARY_ENV

__all__ = ["expand_command", "load_sweep", "main", "run_sweep"]

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """The sweep definition at ``path``, checked by the sweep engine's own schema."""
    import sweeps

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a sweep definition is a YAML mapping, got {type(config)}")
    try:
        sweeps.next_run(config, [], validate=True)
    except Exception as err:  # the engine raises jsonschema / its own errors
        raise ValueError(f"{path} is not a valid W&B sweep definition: {err}") from err
    return config


def expand_command(config: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command line the W&B agent builds for ``params`` from ``config['command']``."""
    out: list[str] = []
    for item in config.get("command", DEFAULT_COMMAND):
        if item == "${env}":
            out.append("/usr/bin/env")
        elif item == "${interpreter}":
            out.append(sys.executable)
        elif item == "${program}":
            if "program" not in config:
                raise ValueError("the command uses ${program} but the sweep sets no `program`")
            out.append(str(config["program"]))
        elif item == "${args}":
            out += [f"--{key}={value}" for key, value in params.items()]
        elif item == "${args_no_hyphens}":
            out += [f"{key}={value}" for key, value in params.items()]
        elif item == "${args_json}":
            out.append(json.dumps(params))
        elif "${" in str(item):
            raise ValueError(f"the local sweep does not support the macro {item!r}")
        else:
            out.append(str(item))
    return out


def _executable(command: list[str]) -> list[str]:
    """The agent runs ``command`` through ``PATH``; ``lightning-noise`` falls back to the one
    installed next to this Python when ``PATH`` lacks it."""
    if shutil.which(command[0]) is None:
        sibling = Path(sys.executable).parent / command[0]
        if sibling.exists():
            return [str(sibling), *command[1:]]
    return command


def run_sweep(
    path: str | os.PathLike, count: int, out_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Run up to ``count`` trials of the sweep at ``path``; returns one record per trial."""
    import sweeps
    from sweeps import RunState, SweepRun

    config = load_sweep(path)
    name = Path(path).stem
    out = Path(out_dir) if out_dir is not None else Path("runs") / "sweeps" / name
    out.mkdir(parents=True, exist_ok=True)
    metric = (config.get("metric") or {}).get("name")
    if config.get("early_terminate"):
        print("note: early_terminate is not applied by the local sweep (runs go to the end)")
    runs: list[SweepRun] = []
    records: list[dict[str, Any]] = []
    for i in range(count):
        proposal = sweeps.next_run(config, runs, validate=False)
        if proposal is None:
            print(f"the sweep's search space is exhausted after {i} runs")
            break
        params = {key: spec["value"] for key, spec in proposal.config.items()}
        command = expand_command(config, params)
        run_name = f"{name}-{i:03d}"
        summary_path = out / run_name / "summary.json"
        env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "WANDB_RUN_GROUP": f"sweep-{name}",
            "WANDB_NAME": run_name,
            SUMMARY_ENV: str(summary_path),
        }
        print(f"[{i + 1}/{count}] {' '.join(command)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(_executable(command), env=env, check=False)
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        ok = done.returncode == 0 and (metric is None or metric in summary)
        if done.returncode == 0 and metric is not None and metric not in summary:
            print(f"run {run_name} did not report {metric!r} (it reported {sorted(summary)})")
        proposal.name = run_name
        proposal.state = RunState.finished if ok else RunState.failed
        proposal.summary_metrics = summary
        proposal.history = [summary] if summary else []
        runs.append(proposal)
        record = {
            "run": run_name,
            "params": params,
            "state": "finished" if ok else "failed",
            "returncode": done.returncode,
            "seconds": round(time.perf_counter() - start, 1),
            "objective": summary.get(metric) if metric else None,
            "command": command,
        }
        records.append(record)
    (out / "sweep.json").write_text(json.dumps(records, indent=1))
    _print_table(records, metric, (config.get("metric") or {}).get("goal", "minimize"))
    return records


def _print_table(records: list[dict[str, Any]], metric: str | None, goal: str) -> None:
    done = [r for r in records if r["objective"] is not None]
    best = None
    if done:
        pick = max if goal == "maximize" else min
        best = pick(done, key=lambda r: r["objective"])
    print(f"\n{'run':<28}{'state':<10}{metric or 'objective':>18}  params")
    for r in records:
        value = "-" if r["objective"] is None else f"{r['objective']:.4f}"
        mark = " *" if r is best else ""
        print(f"{r['run']:<28}{r['state']:<10}{value:>18}  {r['params']}{mark}")
    if best is not None:
        print(f"best ({goal} {metric}): {best['run']} {best['params']}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="lightning-noise sweep",
        description="Run a W&B sweep definition offline with W&B's sweep engine.",
    )
    parser.add_argument("sweep", help="a sweep file, e.g. configs/sweeps/sam_rho.yaml")
    parser.add_argument("--count", type=int, default=5, help="number of runs (default 5)")
    parser.add_argument("--out", default=None, help="folder for summaries (runs/sweeps/<name>)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    if not Path(args.sweep).is_file():
        parser.error(f"no sweep file {args.sweep!r} (see configs/sweeps/)")
    return run_sweep(args.sweep, args.count, args.out)
