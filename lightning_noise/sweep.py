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

Overrides given after the sweep file (``lightning-noise sweep sam_rho --count 3
--trainer.max_epochs=5``) are appended to every run's command line, after the parameters.

Early termination (``early_terminate: {type: hyperband, ...}``) is applied as the W&B
controller and agent apply it: each run's metric history (one entry per validation run, as
the ``WandbLogger`` logs it) is given, as it grows, to the sweep engine's own hyperband rule
(``sweeps.stop_runs``, with every earlier run's history); a run it names is stopped the way
the agent stops one (SIGTERM, then SIGKILL 30 s later). The history comes from
``$LIGHTNING_NOISE_HISTORY``: for a ``lightning-noise`` command the sweep adds the
:class:`~lightning_noise.history.MetricStream` callback that writes it (the one argument it
adds to the agent's command line); another program writes one JSON object a line to that file
itself. A run that writes no history cannot be stopped early, and the sweep says so. Runs
here are sequential (one agent), so hyperband compares each run with the runs before it.

torch and Lightning are not imported here: each run is its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from numbers import Number
from pathlib import Path
from typing import Any

__all__ = ["HISTORY_ENV", "expand_command", "find_sweep", "load_sweep", "main", "run_sweep"]

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]

#: The file of final metrics a ``fit`` writes (``lightning_cli.SUMMARY_ENV``, pinned by
#: tests/test_sweep.py; not imported from there, which would load Lightning).
SUMMARY_ENV = "LIGHTNING_NOISE_SUMMARY"
#: The JSON-lines file of a run's metrics after each validation run (early termination).
HISTORY_ENV = "LIGHTNING_NOISE_HISTORY"
#: What the sweep adds to a ``lightning-noise fit`` command so that the run writes its history.
HISTORY_ARG = "--trainer.callbacks+=lightning_noise.history.MetricStream"
#: Seconds between the agent's SIGTERM and its SIGKILL (``wandb_agent.Agent.KILL_DELAY``).
KILL_DELAY = 30.0
#: Seconds between two reads of a running run's history.
POLL = 0.2


def find_sweep(name: str) -> Path:
    """The sweep file ``name``: a path, or a name (with or without ``.yaml``) looked up in
    ``./configs/sweeps/`` and then in the sweep definitions installed with the package."""
    if Path(name).is_file():
        return Path(name)
    stem = name[:-5] if name.endswith(".yaml") else name
    package = Path(__file__).resolve().parent
    folders = [
        Path.cwd() / "configs" / "sweeps",
        package / "_packaged" / "configs" / "sweeps",  # a wheel
        package.parent / "configs" / "sweeps",  # the repository (an editable install)
    ]
    for folder in folders:
        if (folder / f"{stem}.yaml").is_file():
            return folder / f"{stem}.yaml"
    known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})
    raise SystemExit(
        f"lightning-noise sweep: error: no sweep file or sweep named {name!r}; pass a file, "
        f"or one of: {', '.join(known) or '(none found)'}"
    )


def _plain(value: Any) -> Any:
    """A sweep engine value as a plain Python one (it proposes numpy scalars)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _show(value: Any) -> str:
    """A parameter or metric value for the table: 4 significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """The sweep definition at ``path``, checked by the sweep engine's own schema."""
    import sweeps
    import yaml

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


def _history_arg(command: list[str]) -> list[str]:
    """The argument that makes ``command`` write its history, where it is a
    ``lightning-noise fit`` or ``run <recipe>`` (else nothing: the program writes
    ``$LIGHTNING_NOISE_HISTORY`` itself, or cannot be stopped early)."""
    ours = len(command) > 1 and Path(command[0]).name == "lightning-noise"
    if ours and command[1] in ("fit", "run"):
        return [HISTORY_ARG]
    return []


def _read_history(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of ``path`` after byte ``offset``, and the new offset."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    lines = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return lines, offset + end


def _stop(process: subprocess.Popen) -> None:
    """Stop a run as the W&B agent does: SIGTERM, then SIGKILL after :data:`KILL_DELAY`."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=KILL_DELAY)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _follow(
    process: subprocess.Popen,
    history_path: Path,
    proposal: Any,
    runs: list[Any],
    config: dict[str, Any],
) -> tuple[int | None, list[str]]:
    """Read the run's history as it grows until the run ends; with ``early_terminate``, give
    it to the sweep engine's stopping rule after each entry and stop the run it names.
    Returns the history length at which the run was stopped (or ``None``) and the rule's
    report."""
    import sweeps

    offset = 0
    while True:
        finished = process.poll() is not None
        lines, offset = _read_history(history_path, offset)
        for line in lines:  # one decision per entry, in order, as if read one by one
            proposal.history.append(line)
            if finished or not config.get("early_terminate"):
                continue  # (a run that ended on its own before the controller looked)
            to_stop = sweeps.stop_runs(config, [*runs, proposal])
            if any(run is proposal for run in to_stop):
                info = (proposal.early_terminate_info or {}).get("lines", [])
                _stop(process)
                rest, _ = _read_history(history_path, offset)
                proposal.history += rest  # what it logged before the signal reached it
                return len(proposal.history) - len(rest), info
        if finished:
            return None, []
        time.sleep(POLL)


def run_sweep(
    path: str | os.PathLike,
    count: int,
    out_dir: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run up to ``count`` trials of the sweep at ``path``, each with ``overrides`` appended;
    returns one record per trial."""
    import sweeps
    from sweeps import RunState

    config = load_sweep(path)
    name = Path(path).stem
    out = Path(out_dir) if out_dir is not None else Path("runs") / "sweeps" / name
    out.mkdir(parents=True, exist_ok=True)
    metric = (config.get("metric") or {}).get("name")
    goal = (config.get("metric") or {}).get("goal", "minimize")
    early = config.get("early_terminate")
    if early and early.get("type") != "hyperband":
        raise ValueError(
            f"{path}: early_terminate type {early.get('type')!r} is not one W&B runs; use "
            "hyperband or remove early_terminate"
        )
    runs: list[Any] = []
    records: list[dict[str, Any]] = []
    for i in range(count):
        proposal = sweeps.next_run(config, runs, validate=False)
        if proposal is None:
            print(f"the sweep's search space is exhausted after {i} runs")
            break
        params = {key: _plain(spec["value"]) for key, spec in proposal.config.items()}
        command = [*expand_command(config, params), *(overrides or [])]
        extra = _history_arg(command) if early else []
        run_name = f"{name}-{i:03d}"
        summary_path = out / run_name / "summary.json"
        history_path = out / run_name / "history.jsonl"
        history_path.parent.mkdir(parents=True, exist_ok=True)
        history_path.unlink(missing_ok=True)
        env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "WANDB_RUN_GROUP": f"sweep-{name}",
            "WANDB_NAME": run_name,
            SUMMARY_ENV: str(summary_path),
            HISTORY_ENV: str(history_path),
        }
        print(f"[{i + 1}/{count}] {' '.join(command)}", flush=True)
        start = time.perf_counter()
        proposal.name = run_name
        proposal.state = RunState.running
        process = subprocess.Popen(_executable([*command, *extra]), env=env)
        stopped_at, report = _follow(process, history_path, proposal, runs, config)
        returncode = process.returncode
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if stopped_at is not None:
            # W&B's summary is the last logged value of each metric.
            summary = {k: v for line in proposal.history for k, v in line.items()}
            state = "stopped"
            print(
                f"run {run_name} stopped early by hyperband after {stopped_at} {metric} "
                f"values: {'; '.join(report)}",
                flush=True,
            )
        elif returncode == 0 and (metric is None or metric in summary):
            state = "finished"
        else:
            state = "failed"
            if returncode == 0:
                print(f"run {run_name} did not report {metric!r} (it reported {sorted(summary)})")
        if early and stopped_at is None and not proposal.history:
            print(
                f"note: run {run_name} wrote no metric history to ${HISTORY_ENV}, so "
                "early_terminate could not judge it (it ran to its end)"
            )
        # Stopped runs stay in the sweep as W&B keeps them (killed, with their history).
        proposal.state = {"finished": RunState.finished, "stopped": RunState.killed}.get(
            state, RunState.failed
        )
        proposal.summary_metrics = summary
        if not proposal.history and summary:
            proposal.history = [summary]
        runs.append(proposal)
        objective = summary.get(metric) if metric else None
        records.append(
            {
                "run": run_name,
                "params": params,
                "state": state,
                "returncode": returncode,
                "seconds": round(time.perf_counter() - start, 1),
                "objective": _plain(objective) if isinstance(objective, Number) else None,
                "history": len(proposal.history),
                "stopped_at": stopped_at,
                "command": command,
            }
        )
    (out / "sweep.json").write_text(json.dumps(records, indent=1))
    _print_table(records, metric, goal)
    return records


def _print_table(records: list[dict[str, Any]], metric: str | None, goal: str) -> None:
    done = [r for r in records if r["objective"] is not None and r["state"] == "finished"]
    best = None
    if done:
        pick = max if goal == "maximize" else min
        best = pick(done, key=lambda r: r["objective"])
    print(f"\n{'run':<28}{'state':<10}{metric or 'objective':>18}  params")
    for r in records:
        value = "-" if r["objective"] is None else f"{r['objective']:.4f}"
        params = " ".join(f"{k}={_show(v)}" for k, v in r["params"].items())
        mark = "  *" if r is best else ""
        print(f"{r['run']:<28}{r['state']:<10}{value:>18}  {params}{mark}")
    if best is not None:
        params = " ".join(f"{k}={_show(v)}" for k, v in best["params"].items())
        print(f"best ({goal} {metric}): {best['run']} {params}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="lightning-noise sweep",
        description="Run a W&B sweep definition offline with W&B's sweep engine. Arguments "
        "after the sweep's own (e.g. --trainer.max_epochs=5) are appended to every run.",
    )
    parser.add_argument(
        "sweep", help="a sweep file, or the name of one in configs/sweeps/ (e.g. sam_rho)"
    )
    parser.add_argument("--count", type=int, default=5, help="number of runs (default 5)")
    parser.add_argument("--out", default=None, help="folder for summaries (runs/sweeps/<name>)")
    args, overrides = parser.parse_known_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(
            f"overrides are --key=value arguments appended to every run, got {bad}; "
            "e.g. --trainer.max_epochs=5"
        )
    path = find_sweep(args.sweep)
    try:
        return run_sweep(path, args.count, args.out, overrides)
    except ValueError as err:
        raise SystemExit(f"lightning-noise sweep: error: {err}") from None
