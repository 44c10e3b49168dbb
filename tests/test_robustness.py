"""The noisy-label methods beat cross-entropy on real data: the robustness benchmark, small.

Runs ``benchmarks/robustness.py``'s own training function (one seed, digits at 8x8 with 40%
symmetric label noise, ``test_resnet``) for cross-entropy, Co-teaching and Late Stopping, and
asserts that both methods beat cross-entropy's last-epoch test accuracy by a safe margin.
Late Stopping's final run gets its own optimizer, as the paper's final run does: SGD lr 0.02
with the LR halved at its epochs 5 and 10. With the rounds' constant lr 0.05 the final run on
its ~710 kept samples swung epoch to epoch (0.18-0.91 test accuracy; last epoch 0.474 at seed
2, measured 2026-12-02 on the saved kept sets), so which epoch it ended on decided the test;
with the schedule its last five epochs stayed within 0.90-0.96 at seeds 0, 1 and 2.
Measured with this configuration, whole runs (2026-12-02), last epoch at seeds 0, 1, 2:
CE 0.579, 0.685, 0.585; Late Stopping 0.933, 0.928, 0.928 (F1 0.955, 0.958, 0.930).
The full benchmark (16x16, resnet10t, 3 seeds, 4 noise settings) is in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import pytest
from _bench import import_benchmark

robustness = import_benchmark("robustness")

#: Points of test accuracy by which each method must beat CE's last epoch (Late Stopping,
#: measured at seeds 0-2: 35, 24, 34).
MARGIN = 0.10


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    args = robustness.parse_args(
        [
            "--image-size=8",
            "--channels=1",
            "--backbone=test_resnet",
            "--epochs=20",
            "--final-epochs=15",  # the benchmark's default (10 left the last epoch at 0.39 here)
            "--final-lr=0.02",  # the final run's own schedule (see the module docstring)
            "--final-milestones",
            "5",
            "10",
            f"--root={tmp_path_factory.mktemp('robustness')}",
        ]
    )
    setting = robustness.SETTINGS["sym-40"]
    return {
        method: robustness.run(method, setting, 0, args)
        for method in ("CE", "Co-teaching", "Late Stopping")
    }


@pytest.mark.parametrize("method", ["Co-teaching", "Late Stopping"])
def test_method_beats_cross_entropy_at_40_percent_noise(results, method) -> None:
    ce, other = results["CE"]["last"], results[method]["last"]
    assert other >= ce + MARGIN, f"{method} {other:.3f} vs CE {ce:.3f}"


def test_cross_entropy_memorises_so_its_last_epoch_is_below_its_best(results) -> None:
    # The premise of the comparison: CE peaks early, then fits the noisy labels.
    assert results["CE"]["best"] >= results["CE"]["last"] + 0.05, results["CE"]


def test_late_stopping_removes_noisy_labels(results) -> None:
    # F1 of the removed samples as the noisy ones; random removal of 40% gives 0.4.
    assert results["Late Stopping"]["f1"] > 0.7, results["Late Stopping"]
