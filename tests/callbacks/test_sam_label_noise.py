"""The SAM paper's label-noise claim, reproduced small: SAM beats plain training on digits.

Digits with 40% symmetric label noise, resnet10t from scratch, SGD, 30 epochs, seeds 0-2:
the same run as ``python benchmarks/noisy_digits.py --methods plain SAM --rho 0.5``. Slow
(about 6 minutes on 2 CPU cores): run with ``make test-slow``.
"""

from __future__ import annotations

import statistics

import pytest
from _bench import import_benchmark


@pytest.mark.slow
def test_sam_beats_plain_training_under_label_noise(tmp_path) -> None:
    module = import_benchmark("noisy_digits")
    results = module.main(
        ["--methods", "plain", "SAM", "--rho", "0.5", "--seeds", "0", "1", "2",
         "--root", str(tmp_path), "--no-record"]
    )  # fmt: skip
    plain = statistics.mean(r["test_acc"] for r in results["plain"])
    sam = statistics.mean(r["test_acc"] for r in results["SAM"])
    # Measured: plain 0.59 and SAM 0.88 on seed 0 (benchmarks/RESULTS.md); 0.10 is a safe margin.
    assert sam - plain >= 0.10, (plain, sam)
    # And SAM memorises far fewer of the noisy labels.
    memorised = {m: statistics.mean(r["noisy_memorised"] for r in results[m]) for m in results}
    assert memorised["SAM"] < memorised["plain"] - 0.3, memorised
