"""The README's commands run as written, only shortened.

Every ``lightning-noise`` line of the README's bash blocks runs through the console script's
``main`` in a scratch folder holding copies of ``recipes/`` and ``configs/``, with training
shortened: ``fit``/``run`` get ``configs/trainer/cpu_quick.yaml`` appended and then 1 epoch
of 3 batches (an explicit ``--trainer.max_epochs`` in the line is dropped), ``demo`` runs its
first row for one epoch, and ``sweep`` runs one trial through a copy of the sweep file whose
command adds the same shortening. ``make demo`` and ``make test`` are what CI
runs (``make test`` is this suite), so they are only checked to be Makefile targets.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from lightning_noise.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: The cpu_quick trainer preset, shortened further to 1 epoch of 3 batches for the suite.
QUICK = [
    "--config",
    "configs/trainer/cpu_quick.yaml",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
]


def readme_commands() -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


COMMANDS = readme_commands()


def test_quickstart_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    make_lines = [c for c in COMMANDS if c.startswith("make ")]
    assert make_lines[:2] == ["make demo", "make test"]
    for line in make_lines:
        assert re.search(rf"^{line.split()[1]}:", makefile, re.M), line


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    for folder in ("recipes", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _shortened(argv: list[str], scratch: Path) -> list[str]:
    command = argv[0]
    if command in ("fit", "run"):
        argv = [a for a in argv if not a.startswith("--trainer.max_epochs")]
        return [*argv, *QUICK, "--trainer.enable_progress_bar=false"]
    if command == "demo":
        return [
            "demo",
            "--rows",
            "Cross-entropy (baseline)",
            "--epochs",
            "1",
            "--trainer.limit_train_batches=3",
            "--trainer.enable_progress_bar=false",
        ]
    if command == "sweep":
        sweep = yaml.safe_load((scratch / argv[1]).read_text())
        sweep["command"] = [*sweep["command"][:-1], *QUICK, "${args}"]
        (scratch / argv[1]).write_text(yaml.safe_dump(sweep))
        return ["sweep", argv[1], "--count", "1"]
    return argv


@pytest.mark.parametrize(
    "line", [c for c in COMMANDS if c.startswith("lightning-noise ")], ids=lambda c: c[16:60]
)
def test_readme_command_runs(line, scratch, capsys) -> None:
    argv = _shortened(shlex.split(line)[1:], scratch)
    try:
        main(argv)
    except SystemExit as stop:  # --print_config and --help exit with 0 when done
        assert stop.code in (0, None), f"{line}: exit {stop.code}"
    out = capsys.readouterr().out
    if argv[0] == "recipes":
        assert "digits_sam" in out
    if "--print_config" in argv:
        assert "class_path: lightning_noise.models.ImageClassifier" in out
    if argv[0] == "sweep":
        assert "best (maximize val/acc)" in out
