"""Double backward through the kernels is refused with a clear error (issue 13).

Their backward passes are hand-written (fused Triton kernels, or the same formula in
PyTorch with non-differentiable saved statistics), so a second derivative used to be
silently wrong (PyTorch path) or zero (Triton path). Now ``create_graph=True`` still gives
the right first-order gradient and a second ``grad`` raises :class:`DoubleBackwardError`.
"""

from __future__ import annotations

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


def _ce(impl):
    torch.manual_seed(0)
    x = torch.randn(5, 7, requires_grad=True)
    y = torch.tensor([0, 3, 6, 2, -100])
    return (
        (x,),
        lambda: cross_entropy(x, y, label_smoothing=0.1, impl=impl),
        lambda: F.cross_entropy(x, y, label_smoothing=0.1),
    )


def _softmax(impl):
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 6)
    return (x,), lambda: (softmax(x, impl=impl) * w).sum(), lambda: (x.softmax(-1) * w).sum()


def _lce(impl):
    torch.manual_seed(0)
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    y = torch.tensor([1, 2, 3, 4, 5, -100])
    return (
        (h, w, b),
        lambda: linear_cross_entropy(h, w, y, bias=b, chunk_size=2, impl=impl),
        lambda: F.cross_entropy(h @ w.T + b, y),
    )


CASES = {"cross_entropy": _ce, "softmax": _softmax, "linear_cross_entropy": _lce}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_second_derivative_is_refused_first_is_right(name, impl) -> None:
    inputs, ours, reference = CASES[name](impl)
    if name == "softmax" and impl == "torch":  # torch.softmax itself: twice differentiable
        (g,) = torch.autograd.grad(ours(), inputs, create_graph=True)
        (want,) = torch.autograd.grad(reference(), inputs, create_graph=True)
        torch.testing.assert_close(torch.autograd.grad(g.sum(), inputs)[0],
                                   torch.autograd.grad(want.sum(), inputs)[0])  # fmt: skip
        return
    before = sum(LAUNCHES.values())
    grads = torch.autograd.grad(ours(), inputs, create_graph=True)
    want = torch.autograd.grad(reference(), inputs)
    if impl == "triton":
        assert sum(LAUNCHES.values()) > before, "the Triton path did not run"
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got.detach(), expected, atol=2e-6, rtol=1e-5)
        assert got.requires_grad  # part of the graph, so a second grad cannot drop it
    hvp_input = sum((g * torch.ones_like(g)).sum() for g in grads)
    with pytest.raises(DoubleBackwardError, match=rf"double backward through .*{name}.*"):
        torch.autograd.grad(hvp_input, inputs)
    # also when the kernel's term is only one part of the loss (no silent dropping)
    grads = torch.autograd.grad(ours() + sum((p**2).sum() for p in inputs), inputs,
                                create_graph=True)  # fmt: skip
    with pytest.raises(DoubleBackwardError, match="plain PyTorch ops"):
        grads[0].sum().backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_first_order_backward_unchanged(name, impl) -> None:
    """``create_graph=False`` (plain ``backward``): the gradient is a plain tensor, as before,
    equal to PyTorch's; ``backward(create_graph=True)`` accumulates into ``.grad`` too."""
    inputs, ours, reference = CASES[name](impl)
    ours().backward()
    got = [p.grad.clone() for p in inputs]
    assert all(g.grad_fn is None and not g.requires_grad for g in got)
    for p in inputs:
        p.grad = None
    reference().backward()
    for g, p in zip(got, inputs, strict=True):
        torch.testing.assert_close(g, p.grad, atol=2e-6, rtol=1e-5)
        p.grad = None
    ours().backward(create_graph=True)
    ours().backward(create_graph=True)  # accumulation into a graph-carrying .grad
    for g, p in zip(got, inputs, strict=True):
        torch.testing.assert_close(p.grad.detach(), 2 * g, atol=4e-6, rtol=1e-5)


def test_error_is_a_runtime_error() -> None:
    assert issubclass(DoubleBackwardError, RuntimeError)
