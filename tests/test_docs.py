"""The Python examples of the README, the method cards and the guides run as written.

Each file's ```python blocks run in order in one namespace (a later block may use an earlier
one's names), in a temporary working directory. Only training length is shortened: every
``Trainer`` built by an example gets at most 2 epochs of 2 batches, no logger, no progress bar
and no checkpoints, so the examples' own arguments are otherwise kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    p for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")] if "```python" in p.read_text()
)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _short_trainer(monkeypatch) -> None:
    original = pl.Trainer.__init__

    def init(self, *args, **kwargs):
        asked = kwargs.get("max_epochs")
        # At most 2 epochs; -1 and None (unbounded, e.g. Late Stopping's examples) too.
        kwargs["max_epochs"] = 2 if asked is None or asked < 0 else min(asked, 2)
        kwargs.pop("max_steps", None)
        kwargs.update(
            limit_train_batches=2,
            limit_val_batches=1,
            limit_test_batches=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", init)


def test_docs_have_examples() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "kernels.md", "losses.md", "late_stopping.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_python_examples_run(doc, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _short_trainer(monkeypatch)
    namespace: dict = {"__name__": "__doc_example__"}
    for i, block in enumerate(BLOCK.findall(doc.read_text())):
        code = compile(block, f"{doc.name}[python block {i + 1}]", "exec")
        exec(code, namespace)
