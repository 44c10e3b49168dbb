"""Tests for ``NoiseDetection``: parity with scikit-learn, accumulation, edge cases, DDP sync.

The DDP test runs this file as a script (``python test_noise_detection.py OUT_DIR``) that
starts two gloo processes itself; each updates with its own half and computes the total.
"""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

import lightning_noise.metrics.noise_detection as noise_detection_module
from lightning_noise.metrics import NoiseDetection, noise_detection_scores


def sklearn_scores(flagged: torch.Tensor, is_noisy: torch.Tensor) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        is_noisy.numpy(), flagged.numpy(), average="binary", zero_division=0
    )
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in result.items()}


def random_masks(seed: int, n: int, p_flag: float, p_noisy: float):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen) < p_flag, torch.rand(n, generator=gen) < p_noisy


@pytest.mark.parametrize(
    ("n", "p_flag", "p_noisy"),
    [(1, 0.5, 0.5), (7, 0.3, 0.6), (100, 0.4, 0.4), (1000, 0.05, 0.2), (513, 0.9, 0.01)],
)
@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn_binary_on_random_masks(seed, n, p_flag, p_noisy) -> None:
    flagged, is_noisy = random_masks(seed, n, p_flag, p_noisy)
    expected = sklearn_scores(flagged, is_noisy)
    metric = NoiseDetection()
    metric.update(flagged, is_noisy)
    for got in (as_floats(metric.compute()), as_floats(noise_detection_scores(flagged, is_noisy))):
        assert got == pytest.approx(expected, abs=1e-6)


def test_multiple_updates_accumulate_like_one() -> None:
    flagged, is_noisy = random_masks(0, 300, 0.3, 0.4)
    metric = NoiseDetection()
    for start in range(0, 300, 70):  # uneven chunks, the last one short
        metric.update(flagged[start : start + 70], is_noisy[start : start + 70])
    assert as_floats(metric.compute()) == pytest.approx(sklearn_scores(flagged, is_noisy))
    assert (int(metric.tp), int(metric.fp), int(metric.fn)) == (
        int((flagged & is_noisy).sum()),
        int((flagged & ~is_noisy).sum()),
        int((~flagged & is_noisy).sum()),
    )


def test_merge_state_combines_separate_metrics() -> None:
    flagged, is_noisy = random_masks(1, 200, 0.5, 0.3)
    a, b = NoiseDetection(), NoiseDetection()
    a.update(flagged[:120], is_noisy[:120])
    b.update(flagged[120:], is_noisy[120:])
    a.merge_state(b)
    assert as_floats(a.compute()) == pytest.approx(sklearn_scores(flagged, is_noisy))


def test_reset_clears_the_counts() -> None:
    metric = NoiseDetection()
    metric.update(torch.tensor([True]), torch.tensor([True]))
    metric.reset()
    metric.update(torch.tensor([True]), torch.tensor([False]))
    assert as_floats(metric.compute()) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


@pytest.mark.parametrize(
    ("flagged", "is_noisy", "expected"),
    [
        # Nothing flagged: precision 0/0 := 0; recall 0 of 2.
        ([0, 0, 0], [1, 1, 0], (0.0, 0.0, 0.0)),
        # No noisy sample: recall 0/0 := 0; precision 0 of 1.
        ([1, 0, 0], [0, 0, 0], (0.0, 0.0, 0.0)),
        # Nothing flagged and nothing noisy: all 0 (sklearn's zero_division=0).
        ([0, 0], [0, 0], (0.0, 0.0, 0.0)),
        # Perfect detection.
        ([1, 0, 1], [1, 0, 1], (1.0, 1.0, 1.0)),
        # Everything flagged: recall 1, precision the noise rate.
        ([1, 1, 1, 1], [1, 0, 0, 0], (0.25, 1.0, 0.4)),
    ],
)
def test_edge_cases(flagged, is_noisy, expected) -> None:
    flagged, is_noisy = torch.tensor(flagged).bool(), torch.tensor(is_noisy).bool()
    metric = NoiseDetection()
    metric.update(flagged, is_noisy)
    got = metric.compute()
    assert (float(got["precision"]), float(got["recall"]), float(got["f1"])) == pytest.approx(
        expected
    )
    assert as_floats(got) == pytest.approx(sklearn_scores(flagged, is_noisy))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in got.values())


def test_empty_input_and_no_update_give_zeros() -> None:
    zeros = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    empty = torch.zeros(0, dtype=torch.bool)
    assert as_floats(noise_detection_scores(empty, empty)) == zeros
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        assert as_floats(NoiseDetection().compute()) == zeros
    metric = NoiseDetection()
    metric.update(empty, empty)
    assert as_floats(metric.compute()) == zeros


def test_integer_zero_one_masks_are_accepted() -> None:
    flagged, is_noisy = torch.tensor([1, 1, 0]), torch.tensor([1, 0, 1], dtype=torch.uint8)
    assert as_floats(noise_detection_scores(flagged, is_noisy)) == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    )


@pytest.mark.parametrize(
    ("flagged", "is_noisy", "match"),
    [
        (torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool), "same number"),
        (torch.ones(3), torch.ones(3, dtype=torch.bool), "bool"),
        (torch.tensor([0, 2, 1]), torch.ones(3, dtype=torch.bool), "only 0 and 1"),
    ],
)
def test_bad_input_raises(flagged, is_noisy, match) -> None:
    with pytest.raises(ValueError, match=match):
        NoiseDetection().update(flagged, is_noisy)
    with pytest.raises(ValueError, match=match):
        noise_detection_scores(flagged, is_noisy)


def test_states_are_sum_reduced_for_ddp() -> None:
    metric = NoiseDetection()
    assert {name: metric._reductions[name].__name__ for name in ("tp", "fp", "fn")} == {
        "tp": "dim_zero_sum",
        "fp": "dim_zero_sum",
        "fn": "dim_zero_sum",
    }


def test_doctests() -> None:
    assert doctest.testmod(noise_detection_module, raise_on_error=True).failed == 0


# ------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    flagged, is_noisy = random_masks(7, 301, 0.4, 0.35)
    metric = NoiseDetection()
    # Uneven, disjoint shards: rank 0 the first 200 samples, rank 1 the other 101.
    part = slice(0, 200) if rank == 0 else slice(200, None)
    metric.update(flagged[part], is_noisy[part])
    result = metric.compute()  # syncs the sum-reduced states across the group
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def ddp_main(out_dir: str) -> None:
    import torch.multiprocessing as mp

    init_file = str(Path(out_dir) / "init")
    mp.spawn(_ddp_worker, args=(2, init_file, out_dir), nprocs=2, join=True)


@pytest.mark.ddp
def test_compute_syncs_over_two_processes(tmp_path) -> None:
    from _ddp import run_ddp_script

    run_ddp_script(__file__, tmp_path, timeout=120)
    flagged, is_noisy = random_masks(7, 301, 0.4, 0.35)
    expected = sklearn_scores(flagged, is_noisy)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert as_floats(got) == pytest.approx(expected, abs=1e-6)


if __name__ == "__main__":
    ddp_main(sys.argv[1])
