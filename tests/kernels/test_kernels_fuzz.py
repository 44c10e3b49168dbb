"""Property tests (hypothesis) of the three kernel entry points on hostile input (issue 13).

NaN/inf logits, empty batches, all-ignored targets, targets out of range, wrong shapes and
dtypes, any leading shape: each call gives either a clear ``ValueError``/``TypeError`` or a
result equal to PyTorch's (``F.cross_entropy``, ``torch.softmax``, the head then the loss),
NaN where PyTorch gives NaN, never a crash inside a kernel. Both implementations run: the
PyTorch path, and the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``). Our one documented difference: ``"mean"`` over no target is 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_noise.kernels import cross_entropy, linear_cross_entropy, softmax

FUZZ = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMPLS = ["torch", "triton"]
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPECIAL = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0]
IGNORE = -100
Tensor = torch.Tensor


@st.composite
def values(draw, shape, nonfinite=True):
    """A float32 tensor of ``shape``: moderate values, sometimes NaN/inf/huge ones."""
    n = math.prod(shape)
    finite = st.floats(-30, 30, width=32)
    element = st.one_of(finite, st.sampled_from(SPECIAL)) if nonfinite else finite
    special = draw(st.booleans()) if nonfinite else False
    items = draw(st.lists(element if special else finite, min_size=n, max_size=n))
    return torch.tensor(np.array(items, dtype=np.float32).reshape(shape))


@st.composite
def targets(draw, shape, num_classes):
    """Class indices of ``shape``: in range, ``IGNORE``, and sometimes out of range."""
    n = math.prod(shape)
    good = st.one_of(st.integers(0, max(num_classes - 1, 0)), st.just(IGNORE))
    bad = draw(st.integers(0, 5)) == 0
    element = st.one_of(good, st.sampled_from([-1, num_classes, num_classes + 7])) if bad else good
    items = draw(st.lists(element, min_size=n, max_size=n))
    return torch.tensor(items, dtype=torch.long).reshape(shape)


def out_of_range(target: Tensor, num_classes: int) -> bool:
    kept = target[target != IGNORE]
    return bool(((kept < 0) | (kept >= num_classes)).any())


def reduced(rows: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Our reductions of per-entry losses (0 where ignored; a mean over nothing is 0)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (target != IGNORE).sum().clamp_min(1)


def same(got: Tensor, want: Tensor, dtype: torch.dtype = torch.float32) -> None:
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(
        got.float(), want.float(), atol=tol, rtol=tol, equal_nan=True, check_device=False
    )


# --------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("impl", IMPLS)
@FUZZ
@given(data=st.data())
def test_cross_entropy_fuzz(impl, data) -> None:
    lead = tuple(data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3), "lead"))
    num_classes = data.draw(st.integers(1, 6), "C")
    x = data.draw(values((*lead, num_classes)), "logits")
    y = data.draw(targets(lead, num_classes), "target")
    dtype = data.draw(st.sampled_from(KERNEL_DTYPES), "dtype")
    eps = data.draw(st.sampled_from([0.0, 0.1, 1.0]), "label_smoothing")
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]), "reduction")
    x = x.to(dtype).requires_grad_()
    call = lambda: cross_entropy(  # noqa: E731
        x, y, label_smoothing=eps, reduction=reduction, impl=impl
    )
    if out_of_range(y, num_classes):
        with pytest.raises(ValueError, match="outside"):
            call()
        return
    got = call()
    xf = x.detach().float().requires_grad_()
    rows = F.cross_entropy(
        xf.reshape(-1, num_classes), y.reshape(-1), ignore_index=IGNORE, label_smoothing=eps,
        reduction="none",
    ).reshape(lead)  # fmt: skip
    want = reduced(rows, y, reduction)
    assert got.dtype == torch.float32 and got.shape == want.shape
    same(got, want)
    # gradients (a weighted sum, so "none" is covered too)
    weight = torch.linspace(0.5, 1.5, got.numel()).reshape(got.shape)
    (grad,) = torch.autograd.grad((got * weight).sum(), x)
    (expected,) = torch.autograd.grad((want * weight).sum(), xf)
    assert grad.dtype == dtype
    same(grad, expected, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@FUZZ
@given(data=st.data())
def test_cross_entropy_fused_options_fuzz(impl, data) -> None:
    """MaxSup and z-loss against their formula on PyTorch ops (a term of weight 0 is absent,
    so a -inf logit gives inf, not NaN)."""
    n = data.draw(st.integers(0, 5), "N")
    num_classes = data.draw(st.integers(1, 6), "C")
    x = data.draw(values((n, num_classes)), "logits")
    y = data.draw(targets((n,), num_classes).filter(lambda t: not out_of_range(t, num_classes)))
    alpha = data.draw(st.sampled_from([0.0, 0.2]), "alpha")
    zl = data.draw(st.sampled_from([0.0, 1e-3]), "z_loss")
    got = cross_entropy(x, y, maxsup_alpha=alpha, z_loss=zl, reduction="none", impl=impl)
    want = F.cross_entropy(x, y, ignore_index=IGNORE, reduction="none")
    if alpha:
        want = want + alpha * (x.max(-1).values - x.mean(-1))
    if zl:
        want = want + zl * torch.logsumexp(x, -1) ** 2
    same(got, torch.where(y != IGNORE, want, 0.0))


@FUZZ
@given(data=st.data())
def test_cross_entropy_bad_arguments_fuzz(data) -> None:
    """Wrong dtypes, shapes and types: a clear error, never a kernel crash."""
    case = data.draw(
        st.sampled_from(
            ["float64", "int_logits", "float_target", "bool_target", "shape", "no_class",
             "scalar", "list", "ignore_index", "smoothing"]
        )
    )  # fmt: skip
    impl = data.draw(st.sampled_from(IMPLS))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    kwargs = {}
    if case == "float64":
        x, match = x.double(), "float32, bfloat16 or float16"
    elif case == "int_logits":
        x, match = x.long(), "floating point"
    elif case == "float_target":
        y, match = y.float(), "integer class indices"
    elif case == "bool_target":
        y, match = y.bool(), "integer class indices"
    elif case == "shape":
        y, match = torch.tensor([0, 1]), "shape"
    elif case == "no_class":
        x, y, match = torch.randn(3, 0), torch.full((3,), IGNORE), "no classes"
    elif case == "scalar":
        x, y, match = torch.randn(4), torch.tensor(0), r"\[N, C\]"
    elif case == "list":
        x, match = x.tolist(), "tensors"
    elif case == "ignore_index":
        kwargs["ignore_index"] = data.draw(st.sampled_from([None, 1.5, "a"]))
        match = "ignore_index"
    else:
        kwargs["label_smoothing"] = data.draw(st.sampled_from([-0.1, 1.5, math.nan]))
        match = "label_smoothing"
    with pytest.raises((ValueError, TypeError), match=match):
        cross_entropy(x, y, impl=impl, **kwargs)


# --------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("impl", IMPLS)
@FUZZ
@given(data=st.data())
def test_softmax_fuzz(impl, data) -> None:
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=3), "shape"))
    x = data.draw(values(shape), "x")
    dtype = data.draw(st.sampled_from((*KERNEL_DTYPES, torch.float64, torch.int64)), "dtype")
    dim = data.draw(st.integers(-len(shape) - 1, len(shape)), "dim")
    x = x.to(dtype)
    if dtype not in KERNEL_DTYPES:
        with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
            softmax(x, dim, impl=impl)
        return
    if not shape:
        with pytest.raises(ValueError, match="at least one dimension"):
            softmax(x, dim, impl=impl)
        return
    if not -len(shape) <= dim < len(shape):
        with pytest.raises(ValueError, match="out of range"):
            softmax(x, dim, impl=impl)
        return
    x.requires_grad_()
    got = softmax(x, dim, impl=impl)
    xf = x.detach().float().requires_grad_()
    want = torch.softmax(xf, dim)
    assert got.dtype == dtype and got.shape == x.shape
    same(got, want, dtype)
    dy = torch.linspace(-1, 1, max(got.numel(), 1))[: got.numel()].reshape(got.shape)
    (grad,) = torch.autograd.grad(got, x, dy.to(dtype))
    (expected,) = torch.autograd.grad(want, xf, dy.to(dtype).float())
    same(grad, expected, dtype)


@pytest.mark.parametrize("dim", [None, 1.0, "1"])
def test_softmax_dim_must_be_an_integer(dim) -> None:
    with pytest.raises(TypeError, match="dim must be an integer"):
        softmax(torch.randn(2, 3), dim)


# --------------------------------------------------------------------------- linear CE
@pytest.mark.parametrize("impl", IMPLS)
@FUZZ
@given(data=st.data())
def test_linear_cross_entropy_fuzz(impl, data) -> None:
    lead = tuple(data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=2), "lead"))
    hid = data.draw(st.integers(0, 3), "H")
    vocab = data.draw(st.integers(1, 5), "V")
    h = data.draw(values((*lead, hid)), "hidden")
    w = data.draw(values((vocab, hid), nonfinite=False), "weight") / 10
    b = data.draw(st.one_of(st.none(), values((vocab,), nonfinite=False)), "bias")
    y = data.draw(targets(lead, vocab), "target")
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 4)), "chunk_size")
    eps = data.draw(st.sampled_from([0.0, 0.1]), "label_smoothing")
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]), "reduction")
    params = [t.requires_grad_() for t in (h, w, b) if t is not None]
    call = lambda: linear_cross_entropy(  # noqa: E731
        h, w, y, bias=b, label_smoothing=eps, reduction=reduction, impl=impl, chunk_size=chunk
    )
    if out_of_range(y, vocab):
        with pytest.raises(ValueError, match="outside"):
            call()
        return
    got = call()
    logits = h @ w.T if b is None else h @ w.T + b
    rows = F.cross_entropy(
        logits.reshape(-1, vocab), y.reshape(-1), ignore_index=IGNORE, label_smoothing=eps,
        reduction="none",
    ).reshape(lead)  # fmt: skip
    want = reduced(rows, y, reduction)
    same(got, want)
    if got.numel() and bool(torch.isfinite(h).all()):
        grads = torch.autograd.grad(got.sum(), params)
        expected = torch.autograd.grad(want.sum(), params)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@FUZZ
@given(data=st.data())
def test_linear_cross_entropy_bad_arguments_fuzz(data) -> None:
    case = data.draw(
        st.sampled_from(["float64", "int", "mixed", "no_class", "bias_type", "bias_shape",
                         "h_mismatch", "weight_3d", "target_shape", "chunk"])
    )  # fmt: skip
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    kwargs = {}
    if case == "float64":
        h, w, match = h.double(), w.double(), "float32, bfloat16 or float16"
    elif case == "int":
        h, w, match = h.long(), w.long(), "float32, bfloat16 or float16"
    elif case == "mixed":
        h, match = h.half(), "share a dtype"
    elif case == "no_class":
        w, y, match = torch.randn(0, 4), torch.full((3,), IGNORE), "no classes"
    elif case == "bias_type":
        kwargs["bias"], match = [0.0] * 5, "bias must be a tensor"
    elif case == "bias_shape":
        kwargs["bias"], match = torch.zeros(4), "bias must be"
    elif case == "h_mismatch":
        w, match = torch.randn(5, 3), "same H"
    elif case == "weight_3d":
        w, match = torch.randn(5, 4, 1), "same H"
    elif case == "target_shape":
        y, match = torch.tensor([[0, 1, 2]]), "shape"
    else:
        kwargs["chunk_size"] = data.draw(st.sampled_from([0, -1, 2.0, True]))
        match = "chunk_size"
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(h, w, y, impl=data.draw(st.sampled_from(IMPLS)), **kwargs)
