"""The kernels under ``torch.compile``: custom operators, no graph break, same numbers (issue 15).

Each kernel is a ``torch.library.custom_op`` of the ``lightning_noise`` namespace with a fake
kernel and a registered backward. ``torch.library.opcheck`` checks the registration (schema,
fake kernel against the real one, autograd, AOT dispatch with dynamic shapes); a compiled call
of the public functions is one graph on both paths (``torch._dynamo.explain``), and its value
and gradients equal eager ones. ``aot_eager`` compiles in a second on the CPU; inductor (which
builds C++ with gcc) is checked in the slow tests here, and by default in
``tests/test_compiled_training.py``'s compiled training run.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from lightning_noise.kernels import (
    LAUNCHES,
    DoubleBackwardError,
    cross_entropy,
    linear_cross_entropy,
    softmax,
)

IMPLS = ["torch", "triton"]
OPS = torch.ops.lightning_noise


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 13, generator=g).requires_grad_()
    y = torch.randint(0, 13, (9,), generator=g)
    y[4] = -100
    h = torch.randn(9, 6, generator=g).requires_grad_()
    w = torch.randn(13, 6, generator=g).requires_grad_()
    b = torch.randn(13, generator=g).requires_grad_()
    return x, y, h, w, b


def _all_kernels(impl: str):
    def f(x, y, h, w, b):
        a = cross_entropy(x, y, label_smoothing=0.1, maxsup_alpha=0.2, z_loss=1e-3, impl=impl)
        s = (softmax(x, dim=-1, impl=impl) * torch.arange(13.0)).sum()
        c = linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.05, chunk_size=4, impl=impl)
        r = linear_cross_entropy(h, w, y, bias=b, chunk_size=4, recompute=True, impl=impl)
        n = cross_entropy(x, y, reduction="none", impl=impl).square().sum()
        return a + s + c + r + n

    return f


def _reference(x, y, h, w, b):
    """The same sum from PyTorch ops (MaxSup and z-loss written out)."""
    valid = y != -100
    yv, xv = y[valid], x[valid]
    lse = xv.logsumexp(-1)
    a = F.cross_entropy(xv, yv, label_smoothing=0.1, reduction="none")
    a = (a + 0.2 * (xv.max(-1).values - xv.mean(-1)) + 1e-3 * lse**2).mean()
    s = (x.softmax(-1) * torch.arange(13.0)).sum()
    c = F.cross_entropy(h @ w.T + b, y, label_smoothing=0.05)
    r = F.cross_entropy(h @ w.T + b, y)
    n = F.cross_entropy(x, y, reduction="none").square().sum()
    return a + s + c + r + n


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_kernels_are_one_graph_and_equal_eager(interpret, impl) -> None:
    inputs = _inputs()
    f = _all_kernels(impl)
    explained = torch._dynamo.explain(f)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # the custom operators are nodes of the graph (not decomposed or traced through)
    targets = {str(node.target) for gm in explained.graphs for node in gm.graph.nodes}
    # linear cross-entropy both ways: gradients computed forward (fused), logits recomputed
    for op in (
        "cross_entropy_forward",
        "linear_cross_entropy_fused",
        "linear_cross_entropy_forward",
    ):
        assert f"lightning_noise.{op}.default" in targets, targets
    if impl == "triton":
        assert "lightning_noise.softmax_forward.default" in targets

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    before = sum(LAUNCHES.values())
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, [inputs[0], *inputs[2:]])
    if impl == "triton":  # the compiled graph ran the Triton kernels, forward and backward
        assert sum(LAUNCHES.values()) - before >= 8
    want = _reference(*inputs)
    want_grads = torch.autograd.grad(want, [inputs[0], *inputs[2:]])
    eager = f(*inputs)
    eager_grads = torch.autograd.grad(eager, [inputs[0], *inputs[2:]])
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, e, r in zip(got_grads, eager_grads, want_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _op_cases(impl: str):
    x, y, h, w, b = _inputs()
    xd = x.detach()
    _, lse, amax = OPS.cross_entropy_forward(xd, y, -100, 0.1, 0.2, 1e-3, impl)
    opts = (-100, 0.1, 0.2, 1e-3, impl)
    grad_rows = torch.rand(9)
    no_h = [False, True, True]  # grad_hidden not asked for
    hd, wd, bd = h.detach(), w.detach(), b.detach()
    _, lse_l, amax_l = OPS.linear_cross_entropy_forward(hd, wd, bd, y, 4, *opts, torch.float32)
    cases = [
        (OPS.cross_entropy_forward, (x, y, *opts)),
        (OPS.cross_entropy_forward, (x[:, ::2], y.clamp(0, 6), -100, 0.0, 0.0, 0.0, impl)),
        (OPS.cross_entropy_backward, (xd, y, lse, amax, grad_rows, *opts)),
        (OPS.linear_cross_entropy_forward, (h, w, b, y, 4, *opts, torch.float32)),
        (OPS.linear_cross_entropy_forward, (h, w, None, y, 20, *opts, torch.float32)),
        (
            OPS.linear_cross_entropy_backward,
            (hd, wd, bd, y, lse_l, amax_l, grad_rows, 4, *opts, torch.float32, [True] * 3),
        ),
        (
            OPS.linear_cross_entropy_backward,
            (hd, wd, None, y, lse_l, amax_l, grad_rows, 4, *opts, torch.float32, no_h),
        ),
        # the three-product path: gradients computed in forward, scaled in backward
        (
            OPS.linear_cross_entropy_fused,
            (h, w, b, y, 4, *opts, torch.float32, "mean", [True] * 3),
        ),
        (
            OPS.linear_cross_entropy_fused,
            (h, w, None, y, 20, *opts, torch.float32, "sum", [True, True, False]),
        ),
        (
            OPS.linear_cross_entropy_fused,
            (hd, w, b, y, 4, *opts, torch.float32, "mean", no_h),
        ),
    ]
    if impl == "triton":
        y_soft = OPS.softmax_forward(xd)
        cases += [
            (OPS.softmax_forward, (x,)),
            (OPS.softmax_backward, (y_soft, torch.randn(9, 13))),
        ]
    return cases


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(interpret, impl) -> None:
    """``torch.library.opcheck``: schema, fake kernel vs real outputs (shapes, strides,
    dtypes), autograd registration, and AOT dispatch (static and dynamic shapes)."""
    for op, args in _op_cases(impl):
        torch.library.opcheck(op, args)


def test_double_backward_still_refused_through_the_ops() -> None:
    x, y, *_ = _inputs()
    (g,) = torch.autograd.grad(cross_entropy(x, y, impl="torch"), x, create_graph=True)
    with pytest.raises(DoubleBackwardError):
        g.sum().backward()


@pytest.mark.slow  # inductor's C++ build: ~20 s here (the default suite's compiled training
# test in tests/test_compiled_training.py runs the fused cross-entropy through inductor instead)
@pytest.mark.skipif(shutil.which("gcc") is None, reason="inductor on the CPU needs gcc")
def test_inductor_compiles_the_torch_path() -> None:
    """The default backend (inductor, C++ on the CPU): the operators stay opaque calls in the
    generated code, values and gradients equal eager."""
    inputs = _inputs(1)
    f = _all_kernels("torch")
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, [inputs[0], *inputs[2:]])
    want = f(*inputs)
    want_grads = torch.autograd.grad(want, [inputs[0], *inputs[2:]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="inductor on the CPU needs gcc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiles_the_triton_path_and_autocast(interpret, dtype) -> None:
    """Inductor with the Triton kernels (interpreted on the CPU) and under CPU autocast, where
    ``linear_cross_entropy`` computes the logits in the autocast dtype."""
    x, y, h, w, b = _inputs(2)

    def f(x, y, h, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            c = linear_cross_entropy(h, w, y, bias=b, chunk_size=4, impl="triton")
            a = cross_entropy(x.to(dtype), y, maxsup_alpha=0.1, impl="triton")
        return a + c

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, y, h, w, b)
    got_grads = torch.autograd.grad(got, (x, h, w, b))
    want = f(x, y, h, w, b)
    want_grads = torch.autograd.grad(want, (x, h, w, b))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
