"""The kernels' tile choice: Triton's autotuner on a GPU, one fixed configuration elsewhere.

On the CPU these tests check the candidate list the GPU would time (pruned per ``V`` and
dtype) and that the interpreter goes through the same tuner wrapper with the one
configuration of ``_tiles``. On CUDA (``LIGHTNING_NOISE_TEST_DEVICE=cuda``, the GPU check) the
last test really tunes, with the in-place backward of the fused head + loss, and compares the
result with PyTorch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_noise.kernels import _triton, cross_entropy, linear_cross_entropy

KERNELS = ("ce_forward", "ce_backward", "softmax_forward", "softmax_backward")


def _pruned(n_rows: int, n_cols: int, dtype: torch.dtype, *, interpret: bool) -> list:
    tuner = _triton._jit("ce_forward", interpret)
    named = {"X": torch.empty(1, dtype=dtype), "n_rows": n_rows, "n_cols": n_cols}
    return _triton._prune(interpret, tuner.configs, named)


def _as_tuples(configs: list) -> list[tuple[int, int, int]]:
    return [(c.kwargs["BLOCK_C"], c.num_warps, c.num_stages) for c in configs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_cols", [10, 781, 32000, 50257, 128256])
def test_gpu_candidates_suit_the_vocabulary_and_dtype(monkeypatch, n_cols, dtype) -> None:
    monkeypatch.delenv(_triton.AUTOTUNE_ENV, raising=False)
    configs = _as_tuples(_pruned(8192, n_cols, dtype, interpret=False))
    assert len(configs) == len(set(configs)) > 1, "nothing to choose from"
    pow2 = 1 << (n_cols - 1).bit_length()
    widest = 16384 if dtype == torch.bfloat16 else 8192
    for block_c, warps, _ in configs:
        assert block_c <= min(pow2, widest)
        assert max(4096, block_c) <= 64 * 32 * warps, "more than 64 elements per thread"
    # The fixed heuristic is always a candidate: tuning can only do as well or better.
    _, block_c, warps = _triton._tiles(8192, n_cols, dtype, interpret=False)
    assert (block_c, warps, 1) in configs


def test_autotune_off_and_the_interpreter_use_the_fixed_heuristic(monkeypatch) -> None:
    monkeypatch.setenv(_triton.AUTOTUNE_ENV, "0")
    _, block_c, warps = _triton._tiles(8192, 32000, torch.bfloat16, interpret=False)
    assert _as_tuples(_pruned(8192, 32000, torch.bfloat16, interpret=False)) == [
        (block_c, warps, 1)
    ]
    monkeypatch.delenv(_triton.AUTOTUNE_ENV)
    _, block_c, warps = _triton._tiles(300, 50257, torch.float32, interpret=True)
    assert _as_tuples(_pruned(300, 50257, torch.float32, interpret=True)) == [(block_c, warps, 1)]


def test_rows_per_program_fill_a_tile_and_never_exceed_the_rows() -> None:
    assert _triton._rows_per_program(8192, 16, 4096) == 256
    assert _triton._rows_per_program(3, 16, 4096) == 4  # the next power of two
    assert _triton._rows_per_program(8192, 16384, 4096) == 1


def test_in_place_outputs_are_restored_between_timed_trials() -> None:
    """``ce_backward(out=x)`` writes the gradient over the logits: a timed trial must not."""
    for name in KERNELS:
        tuner = _triton._jit(name, False)
        assert tuner.keys == ["n_cols"]
        expected = ["DX"] if name.endswith("backward") else []
        assert list(tuner.restore_value) == expected, name


def test_the_interpreter_launches_the_chosen_configuration(interpret) -> None:
    if not _triton.interpreting():
        pytest.skip("checks the interpreter's configuration")
    x = torch.randn(37, 1500, requires_grad=True)
    y = torch.randint(1500, (37,))
    cross_entropy(x, y, impl="triton").backward()
    _, block_c, warps = _triton._tiles(37, 1500, x.dtype, interpret=True)
    expected = {"BLOCK_C": block_c, "num_warps": warps, "num_stages": 1}
    for name in ("ce_forward", "ce_backward"):
        assert _triton.chosen_config(name) == expected
        assert _triton.chosen_config(name, n_cols=1500, dtype=torch.float32) == expected
        assert _triton.chosen_config(name, n_cols=1500, dtype=torch.float16) is None
        assert _triton.chosen_config(name, n_cols=1499) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tunes on a CUDA GPU")
def test_tuned_kernels_match_pytorch_on_cuda(monkeypatch) -> None:
    monkeypatch.delenv(_triton.AUTOTUNE_ENV, raising=False)
    for name in KERNELS:  # tune here, whatever the tests before chose with tuning off
        _triton._jit(name, False).cache.clear()
    torch.manual_seed(0)
    n, h, v = 512, 256, 32000
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    target = torch.randint(v, (n,), device="cuda")
    loss = linear_cross_entropy(hidden, weight, target, impl="triton")
    loss.backward()  # the in-place backward, tuned with its output restored between trials
    ref_h = hidden.detach().float().requires_grad_()
    ref_w = weight.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.T, target)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0.0)
    for ours, theirs in ((hidden.grad, ref_h.grad), (weight.grad, ref_w.grad)):
        error = (ours.float() - theirs).norm() / theirs.norm()
        assert error < 2e-2, f"relative error {float(error):.3g} of a bfloat16 gradient"
    candidates = _as_tuples(_pruned(n, v, torch.bfloat16, interpret=False))
    chosen = _triton.chosen_config("ce_backward")
    assert (chosen["BLOCK_C"], chosen["num_warps"], chosen["num_stages"]) in candidates
    for name in KERNELS:
        _triton._jit(name, False).cache.clear()
