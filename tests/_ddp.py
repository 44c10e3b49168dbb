"""Run a test file as a two-process CPU DDP script, shared by the ``@pytest.mark.ddp`` tests.

A DDP test module doubles as the script: its ``if __name__ == "__main__":`` block calls a
function that builds ``pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", ...)`` and
saves what each rank holds under an output folder. Lightning relaunches the script for rank 1
itself; the test process only starts rank 0 in a subprocess (a fresh interpreter, so pytest's
own process never joins a process group) and then compares the saved files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_ddp_script(script: str | Path, *args: str | Path, timeout: float = 300) -> None:
    """Run ``python script *args`` with a clean distributed environment; fail on error.

    Variables of an enclosing launch (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``) are
    removed so that Lightning starts its own two processes on a free port.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")
    }
    # The script imports the shared test helpers (``_trainers``, ...) from tests/.
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
