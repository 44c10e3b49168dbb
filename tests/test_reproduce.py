"""benchmarks/reproduce.py: its rows are docs/reproducing.md's table, and a row runs end to end."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest
from _bench import import_benchmark

from lightning_noise.recipes import find_recipe

reproduce = import_benchmark("reproduce")
common = sys.modules["common"]

ROOT = Path(__file__).resolve().parents[1]


def _doc_table() -> list[list[str]]:
    """The cells of docs/reproducing.md's table, header and separator left out."""
    lines = (ROOT / "docs" / "reproducing.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_doc_table_is_the_scripts_rows() -> None:
    """The doc's row, paper, setting, number and recipe cells are reproduce.ROWS's; every
    recipe exists and each paper number the script compares with is quoted in the doc."""
    doc = _doc_table()
    assert [cells[0] for cells in doc] == [f"`{row.name}`" for row in reproduce.ROWS]
    for cells, row in zip(doc, reproduce.ROWS, strict=True):
        assert cells[1:5] == [row.paper, row.setting, row.number, row.recipes], row.name
        assert reproduce.recipe_names(row.recipes) == [run.recipe for run in row.runs]
        for run in row.runs:
            find_recipe(run.recipe)  # raises for a missing recipe
            if run.paper is not None:
                quoted = {f"{run.paper:.2f}", f"{run.paper:g}"}
                assert any(re.search(rf"\b{re.escape(q)}\b", row.number) for q in quoted), run


@pytest.mark.slow  # 41 s on the shared 2-core CPU: the CLI, then fit and test
def test_a_row_runs_end_to_end_and_prints_paper_vs_ours(tmp_path, capsys, monkeypatch) -> None:
    """CIFAR-10N on generated files: the recipe's labels file is read from --data-dir, the
    printout has the paper's 77.69 next to ours, and results.csv gets the row. The recipe's
    ResNet-34 is swapped for timm's small test_resnet (overrides, as a user may pass); the
    recipes themselves run in tests/test_recipes.py."""
    import numpy as np
    import torch
    from _formats import N_TRAIN_10, train_labels_10, write_cifar10

    data = tmp_path / "data"
    write_cifar10(data / "cifar-10-batches-py")
    clean = train_labels_10()
    worse = np.where(np.arange(N_TRAIN_10) % 4 == 0, (clean + 1) % 10, clean)
    torch.save({"clean_label": clean, "worse_label": worse}, data / "CIFAR-10_human.pt")
    monkeypatch.setattr(common, "RESULTS_CSV", tmp_path / "results.csv")
    (result,) = reproduce.main(
        [
            "cifarn-cifar10n-worst",
            f"--data-dir={data}",
            f"--out={tmp_path / 'runs'}",
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=20",
            "--model.init_args.backbone=test_resnet",
            "--model.init_args.backbone_kwargs=null",  # no cifar_stem: not a plain ResNet
        ]
    )
    assert 0.0 <= result.ours <= 100.0 and result.paper == 77.69
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("cifar10n_baseline"))
    assert f"paper 77.69  ours {result.ours:5.2f}" in line
    assert f"ours - paper {result.ours - 77.69:+.2f}" in line
    assert "shortened by overrides" in out
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["benchmark"], r["case"], r["metric"]) for r in rows} == {
        ("reproduce", "cifarn-cifar10n-worst/cifar10n_baseline (shortened)", "test_acc"),
        ("reproduce", "cifarn-cifar10n-worst/cifar10n_baseline (shortened)", "paper_test_acc"),
    }
    with pytest.raises(SystemExit, match="did you mean cifarn-cifar10n-worst"):
        reproduce.main(["cifarn-cifar10n-wrst", f"--data-dir={data}"])
