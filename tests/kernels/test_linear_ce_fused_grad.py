"""``linear_cross_entropy``'s three-product path: the gradients computed in forward (issue 14).

With a reduced loss and a gradient to come, the forward computes each chunk's logits once,
its loss and at once its logits' gradient, then ``grad_hidden`` and ``grad_weight``; the
backward only scales them by the incoming gradient. Three matrix products per chunk instead
of four (the recompute path, ``recompute=True``, makes the logits again in backward). The
references are the head and ``F.cross_entropy`` (MaxSup's term written out), and the
recompute path itself.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from lightning_noise.kernels import LAUNCHES, DoubleBackwardError, linear_cross_entropy

# The module itself (the package re-exports the function under the module's name).
lce_module = importlib.import_module("lightning_noise.kernels.linear_cross_entropy")
OPS = torch.ops.lightning_noise
IMPLS = ["torch", "triton"]


def _problem(dtype, *, n=50, hdim=16, vocab=300, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[torch.tensor([0, 7, 8, 31]) % n] = -100
    return h, w, b, y


def _head_loss(h, w, b, y, *, eps=0.0, alpha=0.0, reduction="mean"):
    """The head + ``F.cross_entropy`` with label smoothing; MaxSup's ``alpha * (max - mean)``
    of the rows not ignored added as the paper writes it."""
    logits = F.linear(h, w, b)
    rows = F.cross_entropy(logits, y, label_smoothing=eps, reduction="none")
    valid = y != -100
    rows = rows + alpha * torch.where(valid, logits.max(-1).values - logits.mean(-1), 0.0)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


class _count_logits:
    """Counts the calls of the module's ``_logits`` (one ``hidden @ weight.T`` each)."""

    def __enter__(self):
        self.calls = 0
        real = lce_module._logits

        def counted(*args):
            self.calls += 1
            return real(*args)

        self._patch = mock.patch.object(lce_module, "_logits", counted)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in the Frobenius norm, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


def _params(h, w, b):
    return [p for p in (h, w, b) if p is not None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("eps", "alpha"), [(0.0, 0.0), (0.1, 0.0), (0.0, 0.2)], ids=["ce", "smooth", "maxsup"]
)
def test_values_and_gradients_equal_the_head_in_float32(interpret, impl, reduction, eps, alpha):
    h, w, b, y = _problem(torch.float32)
    launches = sum(LAUNCHES.values())
    with _count_logits() as counted:
        loss = linear_cross_entropy(
            h, w, y, bias=b, label_smoothing=eps, maxsup_alpha=alpha, reduction=reduction,
            chunk_size=16, impl=impl,
        )  # fmt: skip
        grads = torch.autograd.grad(2.5 * loss, _params(h, w, b))  # a non-unit upstream
    assert counted.calls == 4  # 50 rows in chunks of 16: one product with the weight each
    if impl == "triton":
        assert sum(LAUNCHES.values()) >= launches + 8  # forward and backward kernel per chunk
    want = _head_loss(h, w, b, y, eps=eps, alpha=alpha, reduction=reduction)
    want_grads = torch.autograd.grad(2.5 * want, _params(h, w, b))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        # float32 rounding scales with the gradient: the sum's entries reach ~10 here, where
        # one ulp is ~1e-6 (a fixed 1e-6 failed on another CPU's BLAS by 1.2e-6 at one entry)
        scale = max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(got, ref, atol=1e-6 * scale, rtol=1e-5)
    # and the recompute path, four products per chunk, gives the same numbers
    with _count_logits() as counted:
        again = linear_cross_entropy(
            h, w, y, bias=b, label_smoothing=eps, maxsup_alpha=alpha, reduction=reduction,
            chunk_size=16, impl=impl, recompute=True,
        )  # fmt: skip
        again_grads = torch.autograd.grad(2.5 * again, _params(h, w, b))
    assert counted.calls == 8
    torch.testing.assert_close(again, loss, atol=0, rtol=0)
    for got, ref in zip(grads, again_grads, strict=True):  # rounded in another order only
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bfloat16_equals_the_recompute_path_and_the_head(interpret, impl, reduction) -> None:
    h, w, b, y = _problem(torch.bfloat16, n=40, vocab=200, seed=1)
    options = dict(bias=b, label_smoothing=0.05, reduction=reduction, chunk_size=16, impl=impl)
    loss = linear_cross_entropy(h, w, y, **options)
    grads = torch.autograd.grad(loss * 2.5, (h, w, b))
    again = linear_cross_entropy(h, w, y, recompute=True, **options)
    again_grads = torch.autograd.grad(again * 2.5, (h, w, b))
    ref = [t.detach().double().requires_grad_() for t in (h, w, b)]
    want = _head_loss(*ref, y, eps=0.05, reduction=reduction)
    want_grads = torch.autograd.grad(want * 2.5, ref)
    torch.testing.assert_close(loss, again, atol=0, rtol=0)  # the same bfloat16 logits
    torch.testing.assert_close(loss.double(), want, atol=2e-2, rtol=2e-2)
    for got, same, ref_g in zip(grads, again_grads, want_grads, strict=True):
        assert got.dtype == torch.bfloat16
        # The logits' gradient is rounded to bfloat16 before the scale by 2.5 here, after it
        # on the recompute path: equal up to bfloat16 rounding, both near float64's.
        assert _relative_error(got, same) < 1e-2
        assert _relative_error(got, ref_g) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_under_autocast_matches_the_autocast_head(interpret, impl, hidden_dtype) -> None:
    """Lightning's ``bf16-mixed``: float32 parameters, the logits in bfloat16 (as ``F.linear``
    computes them under autocast), each gradient in its input's dtype."""
    h, w, b, y = _problem(torch.float32, n=48, vocab=250, seed=2)
    h = h.detach().to(hidden_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), _count_logits() as counted:
        loss = linear_cross_entropy(h, w, y, bias=b, chunk_size=16, impl=impl)
        want = F.cross_entropy(F.linear(h, w, b), y)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert counted.calls == 3
    want_grads = torch.autograd.grad(want, (h, w, b))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want.float(), atol=1e-5, rtol=1e-5)
    for got, ref, param in zip(grads, want_grads, (h, w, b), strict=True):
        assert got.dtype == param.dtype
        assert _relative_error(got, ref) < 1e-2


def test_the_path_is_chosen_by_reduction_grad_mode_and_recompute() -> None:
    """Three products (one ``_logits`` per chunk) only for a reduced loss whose gradient will
    be asked for; ``reduction="none"``, no-grad calls and ``recompute=True`` keep the
    recompute path (two ``_logits`` per chunk when differentiated, one without)."""
    h, w, b, y = _problem(torch.float32)
    run = dict(bias=b, chunk_size=25, impl="torch")  # 2 chunks

    def calls(fn) -> int:
        with _count_logits() as counted:
            fn()
        return counted.calls

    assert calls(lambda: linear_cross_entropy(h, w, y, **run).backward()) == 2
    assert calls(lambda: linear_cross_entropy(h, w, y, recompute=False, **run).backward()) == 2
    assert calls(lambda: linear_cross_entropy(h, w, y, recompute=True, **run).backward()) == 4
    none = dict(run, reduction="none")
    assert calls(lambda: linear_cross_entropy(h, w, y, **none).sum().backward()) == 4
    with torch.no_grad():  # no gradient: forward only, nothing computed for a backward
        assert calls(lambda: linear_cross_entropy(h, w, y, recompute=False, **run)) == 2
    frozen = [t.detach() for t in (h, w, b)]
    with mock.patch.object(lce_module, "linear_cross_entropy_fused") as fused:
        linear_cross_entropy(frozen[0], frozen[1], y, bias=frozen[2], impl="torch")
        linear_cross_entropy(h, w, y, bias=b, reduction="none", impl="torch")
    fused.assert_not_called()
    # only the weight trains (a frozen backbone): grad_hidden is not computed
    w_only = w.detach().requires_grad_()
    loss = linear_cross_entropy(frozen[0], w_only, y, impl="torch")
    (gw,) = torch.autograd.grad(loss, w_only)
    (want,) = torch.autograd.grad(F.cross_entropy(frozen[0] @ w_only.T, y), w_only)
    torch.testing.assert_close(gw, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_sam_like_double_forward_then_backward(interpret, impl) -> None:
    """SAM's step: forward and backward, perturb the weight, forward and backward again (the
    second gradient at the perturbed weight), restore; and two forwards summed, then one
    backward. Each equals the head's."""
    h, w, b, y = _problem(torch.float32, seed=3)
    run = dict(bias=b, chunk_size=16, impl=impl)
    head = dict(bias=b)

    def grads_of(f):
        for p in (h, w, b):
            p.grad = None
        f().backward()
        return [p.grad.clone() for p in (h, w, b)]

    def sam_step(loss_fn):
        first = grads_of(lambda: loss_fn(h, w, y))
        e = 0.05 * first[1] / first[1].norm()
        with torch.no_grad():
            w.add_(e)
        second = grads_of(lambda: loss_fn(h, w, y))
        with torch.no_grad():
            w.sub_(e)
        return first + second

    ours = sam_step(lambda h, w, y: linear_cross_entropy(h, w, y, **run))
    want = sam_step(lambda h, w, y: F.cross_entropy(F.linear(h, w, head["bias"]), y))
    for got, ref in zip(ours, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    w2 = (w * 1.1).detach().requires_grad_()
    ours = torch.autograd.grad(
        linear_cross_entropy(h, w, y, **run) + 0.5 * linear_cross_entropy(h, w2, y, **run),
        (h, w, w2),
    )
    want = torch.autograd.grad(
        F.cross_entropy(F.linear(h, w, b), y) + 0.5 * F.cross_entropy(F.linear(h, w2, b), y),
        (h, w, w2),
    )
    for got, ref in zip(ours, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_backward_twice_and_double_backward_fail_clearly() -> None:
    h, w, b, y = _problem(torch.float32, n=12, vocab=20)
    loss = linear_cross_entropy(h, w, y, bias=b, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second time.*recompute=True"):
        loss.backward()
    loss = linear_cross_entropy(h, w, y, bias=b, impl="torch")
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    # recompute=True backpropagates twice with retain_graph, as PyTorch's head does
    for p in (h, w, b):
        p.grad = None
    loss = linear_cross_entropy(h, w, y, bias=b, impl="torch", recompute=True)
    loss.backward(retain_graph=True)
    loss.backward()
    F.cross_entropy(F.linear(h, w, b), y).backward(gradient=torch.tensor(-2.0))
    for p in (h, w, b):
        torch.testing.assert_close(p.grad, torch.zeros_like(p), atol=1e-6, rtol=0)
    # double backward: the first derivative is right and carries a graph, the second refused
    loss = linear_cross_entropy(h, w, y, bias=b, impl="torch")
    grads = torch.autograd.grad(3.0 * loss, (h, w, b), create_graph=True)
    want = torch.autograd.grad(3.0 * F.cross_entropy(F.linear(h, w, b), y), (h, w, b))
    for got, ref in zip(grads, want, strict=True):
        assert got.requires_grad
        torch.testing.assert_close(got.detach(), ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(DoubleBackwardError, match="plain PyTorch ops"):
        torch.autograd.grad(sum(g.sum() for g in grads), (h,))


class _NoHostReads(contextlib.ContextDecorator):
    """Fails on the tensor-to-host reads of the sync audit (``item``, ``bool``, ``float``,
    ``int``, ``tolist``, ``cpu``, ``numpy``)."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")

    def __enter__(self):
        def refuse(name):
            def method(*_, **__):
                raise AssertionError(f"host read Tensor.{name} on the hot path")

            return method

        self._patches = [mock.patch.object(torch.Tensor, n, refuse(n)) for n in self.NAMES]
        for p in self._patches:
            p.__enter__()
        return self

    def __exit__(self, *exc):
        for p in reversed(self._patches):
            p.__exit__(*exc)


def test_the_mean_divisor_stays_on_the_device() -> None:
    """The fused operator and its backward read nothing back to the host (the count of rows
    not ignored is a tensor), so that on a GPU they queue without a synchronisation."""
    h, w, b, y = _problem(torch.float32, n=20, vocab=30)
    with _NoHostReads():
        loss, *_ = OPS.linear_cross_entropy_fused(
            h, w, b, y, 8, -100, 0.1, 0.1, 0.0, "torch", torch.float32, "mean", [True] * 3
        )
        grads = torch.autograd.grad(loss, (h, w, b))
    want = torch.autograd.grad(linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1,
                                                    maxsup_alpha=0.1, impl="torch",
                                                    recompute=True), (h, w, b))  # fmt: skip
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-6)


def test_memory_held_between_forward_and_backward() -> None:
    """Saved for backward: the inputs (references, not copies) and the gradients, grad_weight
    in float32; no logits. The recompute path holds the inputs and three numbers per row."""
    n, hdim, vocab = 256, 16, 4096
    h, w, b, y = _problem(torch.bfloat16, n=n, hdim=hdim, vocab=vocab)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    for recompute in (False, True):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = linear_cross_entropy(h, w, y, bias=b, impl="torch", recompute=recompute)
        held = sorted(saved, key=str)
        loss.backward()
        inputs = [((n, hdim), torch.bfloat16), ((vocab, hdim), torch.bfloat16),
                  ((vocab,), torch.bfloat16)]  # fmt: skip
        if recompute:
            rows = [((n,), torch.int64), ((n,), torch.float32), ((n,), torch.int32)]
            rows.append(((), torch.int64))  # the mean's count, saved by its division
            assert held == sorted(inputs + rows, key=str)
        else:
            grads = [((n, hdim), torch.bfloat16), ((vocab, hdim), torch.float32),
                     ((vocab,), torch.float32)]  # fmt: skip
            assert held == sorted(inputs + grads, key=str)


def test_errors_name_the_fix() -> None:
    h, w, _, y = _problem(torch.float32, n=6, vocab=10)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        linear_cross_entropy(h, w, y, reduction="none", recompute=False)
    with pytest.raises(ValueError, match="recompute must be True, False or None"):
        linear_cross_entropy(h, w, y, recompute="yes")


def test_paths_benchmark_runs_both_paths() -> None:
    """``benchmarks/linear_ce_paths.py`` (the RESULTS.md timing) at a toy size: both paths
    timed in one run, a positive ratio."""
    path = Path(__file__).parents[2] / "benchmarks" / "linear_ce_paths.py"
    spec = importlib.util.spec_from_file_location("linear_ce_paths", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with _count_logits() as counted:
        out = bench.main(["--rows", "64", "--hidden", "8", "--vocab", "100", "--repeats", "1"])
    # warm-up and one repeat, one chunk each: 1 logits product (three-product path) + 2
    assert counted.calls == 2 * (1 + 2)
    assert out["three_s"] > 0 and out["four_s"] > 0
    assert out["ratio"] == out["three_s"] / out["four_s"]
