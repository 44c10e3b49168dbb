"""The Triton kernels against PyTorch, forward and backward, run by Triton's interpreter.

``TRITON_INTERPRET=1`` (set per test by the ``interpret`` fixture of ``conftest.py``) makes the
Triton path run on the CPU (``LIGHTNING_NOISE_TEST_DEVICE=cuda`` compiles it for the GPU
instead); each test checks :data:`LAUNCHES` to prove that the kernels really ran. The
references are PyTorch's own ops (``torch.softmax``, ``F.cross_entropy``) and, for MaxSup and
z-loss, the formulas written out here in float64.
"""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_noise.kernels import (
    LAUNCHES,
    cross_entropy,
    linear_cross_entropy,
    resolve_impl,
    softmax,
)
from lightning_noise.kernels.linear_cross_entropy import CHUNK_ROWS, default_chunk_rows

#: (atol, rtol) per dtype, for values and gradients of order 1.
TOL = {
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOL)


class launched:
    """Context manager asserting that kernel ``name`` was launched inside it."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def __enter__(self) -> None:
        self.before = {n: LAUNCHES[n] for n in self.names}

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for name in self.names:
                assert LAUNCHES[name] > self.before[name], f"{name} did not run"


def close(got, want, dtype, scale=1.0) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)


def test_doctests() -> None:
    # The package re-exports functions under the modules' names: import the modules by path.
    for name in ("cross_entropy", "linear_cross_entropy", "softmax"):
        module = importlib.import_module(f"lightning_noise.kernels.{name}")
        assert doctest.testmod(module, raise_on_error=True).failed == 0


# ------------------------------------------------------------------------------ softmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "dim"), [((1823, 781), -1), ((3, 50257), -1), ((4, 33, 5), 1)])
def test_softmax_matches_torch_forward_and_backward(interpret, shape, dim, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    with launched("softmax_forward", "softmax_backward"):
        y = softmax(x, dim=dim, impl="triton")
        (dx,) = torch.autograd.grad(y, x, dy)
    ref = x.detach().float().requires_grad_()
    y_ref = torch.softmax(ref, dim=dim)
    (dx_ref,) = torch.autograd.grad(y_ref, ref, dy.float())
    assert y.dtype == dx.dtype == dtype
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)


def test_softmax_on_non_contiguous_input(interpret) -> None:
    base = torch.randn(64, 300, dtype=torch.float64).float()
    for x in (base.t(), base[:, ::3], base[::2, 10:250]):
        assert not x.is_contiguous()
        x = x.detach().requires_grad_()
        with launched("softmax_forward"):
            y = softmax(x, dim=-1, impl="triton")
        torch.testing.assert_close(y, torch.softmax(x, dim=-1))
        dy = torch.randn_like(y).t().contiguous().t()  # a strided upstream gradient
        (dx,) = torch.autograd.grad(y, x, dy)
        (dx_ref,) = torch.autograd.grad(torch.softmax(x, dim=-1), x, dy)
        torch.testing.assert_close(dx, dx_ref)


def test_softmax_of_large_logits_is_finite(interpret) -> None:
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-3e4, -3e4, -3e4]])
    y = softmax(x, impl="triton")
    torch.testing.assert_close(y, torch.softmax(x.double(), dim=-1).float())


# ------------------------------------------------------------------------ cross-entropy


def formula(x, y, *, eps=0.0, alpha=0.0, zl=0.0, ignore_index=-100, reduction="mean"):
    """The fused loss per the module's equation, from scratch in float64."""
    x = x.double()
    valid = y != ignore_index
    safe = torch.where(valid, y, 0)
    lse = torch.logsumexp(x, dim=-1)
    x_y = x.gather(-1, safe[..., None]).squeeze(-1)
    mean = x.mean(dim=-1)
    loss = (1 - eps) * (lse - x_y) + eps * (lse - mean)
    loss = loss + alpha * (x.max(dim=-1).values - mean) + zl * lse**2
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def _problem(shape, dtype, seed=0, ignore_fraction=0.1, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    y[torch.rand(shape[:-1], generator=gen) < ignore_fraction] = -100
    return x, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1823, 781), (6, 50257)])
def test_cross_entropy_matches_pytorch(interpret, shape, reduction, dtype) -> None:
    x, y = _problem(shape, dtype)
    x.requires_grad_()
    upstream = torch.rand(shape[:-1]) if reduction == "none" else torch.tensor(1.7)
    with launched("ce_forward", "ce_backward"):
        loss = cross_entropy(x, y, reduction=reduction, impl="triton")
        (dx,) = torch.autograd.grad(loss, x, upstream)
    ref = x.detach().float().requires_grad_()
    want = F.cross_entropy(ref, y, reduction=reduction)
    (dx_ref,) = torch.autograd.grad(want, ref, upstream)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    # The loss is computed in float32 from the (rounded) inputs: float32 tolerance.
    torch.testing.assert_close(loss, want, atol=1e-4 if reduction == "sum" else 1e-5, rtol=1e-5)
    close(dx, dx_ref, dtype, scale=0.1 if dtype == torch.float32 else 1.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize(
    "options",
    [
        dict(eps=0.1),
        dict(alpha=0.15),
        dict(zl=1e-3),
        dict(eps=0.2, alpha=0.1, zl=1e-4),
    ],
    ids=["smoothing", "maxsup", "z-loss", "all"],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_options_match_the_formula(interpret, impl, options, reduction) -> None:
    x, y = _problem((257, 1031), torch.float32, seed=1)
    x.requires_grad_()
    kwargs = dict(
        label_smoothing=options.get("eps", 0.0),
        maxsup_alpha=options.get("alpha", 0.0),
        z_loss=options.get("zl", 0.0),
    )
    upstream = torch.rand(257) if reduction == "none" else torch.tensor(0.8)
    names = ("ce_forward", "ce_backward") if impl == "triton" else ()
    with launched(*names):
        loss = cross_entropy(x, y, reduction=reduction, impl=impl, **kwargs)
        (dx,) = torch.autograd.grad(loss, x, upstream)
    ref = x.detach().double().requires_grad_()
    want = formula(ref, y, reduction=reduction, **options)
    (dx_ref,) = torch.autograd.grad(want, ref, upstream.double())
    torch.testing.assert_close(loss.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-7, rtol=1e-4)


def test_label_smoothing_equals_pytorch_in_value_and_gradient(interpret) -> None:
    x, y = _problem((300, 97), torch.float32, seed=2)
    x.requires_grad_()
    loss = cross_entropy(x, y, label_smoothing=0.3, impl="triton")
    (dx,) = torch.autograd.grad(loss, x)
    want = F.cross_entropy(x, y, label_smoothing=0.3)
    (dx_ref,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(dx, dx_ref)


def test_cross_entropy_is_stable_for_logits_of_magnitude_1e4(interpret) -> None:
    x, y = _problem((64, 500), torch.float32, seed=3, scale=1e4)
    x.requires_grad_()
    for kwargs in (dict(), dict(label_smoothing=0.1, maxsup_alpha=0.1)):
        loss = cross_entropy(x, y, reduction="none", impl="triton", **kwargs)
        (dx,) = torch.autograd.grad(loss.sum(), x)
        options = dict(eps=kwargs.get("label_smoothing", 0.0), alpha=kwargs.get("maxsup_alpha", 0))
        ref = x.detach().double().requires_grad_()
        want = formula(ref, y, reduction="none", **options)
        (dx_ref,) = torch.autograd.grad(want.sum(), ref)
        assert torch.isfinite(loss).all() and torch.isfinite(dx).all()
        torch.testing.assert_close(loss.double(), want, atol=1e-2, rtol=1e-6)
        torch.testing.assert_close(dx.double(), dx_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_ignored_gives_zero_not_nan(interpret, impl) -> None:
    x = torch.randn(5, 11, requires_grad=True)
    y = torch.full((5,), -100)
    loss = cross_entropy(x, y, label_smoothing=0.1, impl=impl)
    (dx,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.count_nonzero(dx) == 0
    assert torch.isnan(F.cross_entropy(x, y))  # what PyTorch gives


def test_custom_ignore_index_and_leading_dimensions(interpret) -> None:
    x, y = _problem((3, 7, 129), torch.float32, seed=4)
    y[y == -100] = 5
    y[0, :3] = 7  # a custom ignore_index
    x.requires_grad_()
    with launched("ce_forward"):
        loss = cross_entropy(x, y, ignore_index=7, reduction="none", impl="triton")
    assert loss.shape == (3, 7) and (loss[0, :3] == 0).all()
    want = F.cross_entropy(x.reshape(-1, 129), y.reshape(-1), ignore_index=7, reduction="none")
    torch.testing.assert_close(loss, want.reshape(3, 7))


def test_non_contiguous_logits_and_untouched_input(interpret) -> None:
    base = torch.randn(400, 96)
    y = torch.randint(0, 64, (96,))
    for x in (base.t()[:, :64], base[:96, :64], base.reshape(96, 400)[:, ::5][:, :64]):
        assert not x.is_contiguous()
        x = x.detach().requires_grad_()
        before = x.detach().clone()
        with launched("ce_forward", "ce_backward"):
            loss = cross_entropy(x, y, maxsup_alpha=0.1, impl="triton")
            (dx,) = torch.autograd.grad(loss, x)
        ref = x.detach().double().requires_grad_()
        want = formula(ref, y, alpha=0.1)
        (dx_ref,) = torch.autograd.grad(want, ref)
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx.double(), dx_ref, atol=1e-7, rtol=1e-4)
        assert torch.equal(x.detach(), before)  # the logits are never overwritten


def test_every_launch_runs_on_its_inputs_device(interpret, monkeypatch) -> None:
    """Triton launches on the current CUDA device, not on its arguments' device, so each launch
    must first make its input's device current (else a tensor on a second GPU is read from the
    first). There is no GPU here: this checks the two halves that can be checked on the CPU.
    Every launch asks ``on_device`` for its input's device, and ``on_device`` gives
    ``torch.cuda.device`` of a CUDA device (index kept; nothing is initialised until it is
    entered) and a context that does nothing on the CPU."""
    import contextlib

    from lightning_noise.kernels import _triton

    asked: list[torch.device] = []
    real = _triton.on_device

    def spy(device: torch.device):
        asked.append(device)
        return real(device)

    monkeypatch.setattr(_triton, "on_device", spy)
    x = torch.randn(6, 9, requires_grad=True)
    y = torch.tensor([0, 3, 8, 2, 1, 5])
    before = sum(LAUNCHES.values())
    with launched("ce_forward", "ce_backward", "softmax_forward", "softmax_backward"):
        cross_entropy(x, y, impl="triton").backward()
        softmax(x, impl="triton").sum().backward()
    assert sum(LAUNCHES.values()) - before == 4
    assert asked == [x.device] * 4

    assert isinstance(real(torch.device("cpu")), contextlib.nullcontext)
    guard = real(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_dispatch_and_errors(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert resolve_impl("auto", x) == "torch"
    before = sum(LAUNCHES.values())
    cross_entropy(x, y)  # auto on the CPU without the interpreter: PyTorch, no launch
    softmax(x)
    assert sum(LAUNCHES.values()) == before
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_entropy(x, y, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        softmax(x, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", x) == "triton"
    with launched("ce_forward"):
        cross_entropy(x, y)
    for kwargs, match in [
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(maxsup_alpha=-0.1), "maxsup_alpha"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(reduction="avg"), "reduction"),
    ]:
        with pytest.raises(ValueError, match=match):
            cross_entropy(x, y, **kwargs)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(x, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        cross_entropy(x.double(), y)
    with pytest.raises(ValueError, match="out of range"):
        softmax(x, dim=2)


# ------------------------------------------------------------------ linear cross-entropy


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_matches_the_head_plus_loss(interpret, impl, bias, reduction):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 50, 32, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(1000, 32, generator=gen) * 0.2).requires_grad_()
    b = torch.randn(1000, generator=gen).requires_grad_() if bias else None
    y = torch.randint(0, 1000, (2, 50), generator=gen)
    y[0, :5] = -100
    options = dict(label_smoothing=0.1, maxsup_alpha=0.1, z_loss=1e-3)
    upstream = torch.rand(2, 50) if reduction == "none" else torch.tensor(1.3)
    names = ("ce_forward", "ce_backward") if impl == "triton" else ()
    with launched(*names):
        loss = linear_cross_entropy(h, w, y, bias=b, reduction=reduction, impl=impl, **options)
        params = [p for p in (h, w, b) if p is not None]
        grads = torch.autograd.grad(loss, params, upstream)
    ref = [p.detach().double().requires_grad_() for p in params]
    logits = ref[0] @ ref[1].T + (ref[2] if bias else 0)
    want = formula(logits, y, eps=0.1, alpha=0.1, zl=1e-3, reduction=reduction)
    grads_ref = torch.autograd.grad(want, ref, upstream.double())
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_linear_cross_entropy_in_bfloat16(interpret) -> None:
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(64, 48, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(3000, 48, generator=gen) * 0.1).bfloat16().requires_grad_()
    y = torch.randint(0, 3000, (64,), generator=gen)
    loss = linear_cross_entropy(h, w, y, impl="triton")
    gh, gw = torch.autograd.grad(loss, (h, w))
    hr, wr = (t.detach().float().requires_grad_() for t in (h, w))
    want = F.cross_entropy(hr @ wr.T, y)
    gh_ref, gw_ref = torch.autograd.grad(want, (hr, wr))
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gh.float(), gh_ref, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw.float(), gw_ref, atol=2e-3, rtol=2e-2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in the Frobenius norm, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy_under_autocast_matches_the_autocast_head(
    interpret, impl, hidden_dtype
) -> None:
    """Lightning's ``bf16-mixed``: float32 parameters, hidden states in float32 or already in
    bfloat16. The logits are computed in bfloat16 forward and backward alike, as ``F.linear``
    computes them under autocast, and each gradient comes back in its input's dtype. Logits of
    about 10 make a backward that recomputes them in float32 (against an ``lse`` taken from
    the bfloat16 ones) miss by about 5%."""
    gen = torch.Generator().manual_seed(7)
    h = (torch.randn(96, 32, generator=gen) * 2).to(hidden_dtype).requires_grad_()
    w = torch.randn(700, 32, generator=gen).requires_grad_()
    b = torch.randn(700, generator=gen).requires_grad_()
    y = torch.randint(0, 700, (96,), generator=gen)
    y[:5] = -100
    names = ("ce_forward", "ce_backward") if impl == "triton" else ()
    with launched(*names):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, y, bias=b, chunk_size=16, impl=impl)
            want = F.cross_entropy(F.linear(h, w, b), y)
        grads = torch.autograd.grad(loss, (h, w, b))
    grads_ref = torch.autograd.grad(want, (h, w, b))
    assert loss.dtype == torch.float32
    # The same bfloat16 logits on both sides, the loss taken from them in float32.
    torch.testing.assert_close(loss, want.float(), atol=1e-5, rtol=1e-5)
    for got, ref, param in zip(grads, grads_ref, (h, w, b), strict=True):
        assert got.dtype == param.dtype
        # bfloat16 rounding of the logits' gradient (the interpreter truncates it) and of the
        # products: about 0.2-0.4% here.
        assert relative_error(got, ref) < 1e-2


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_cross_entropy_sums_bfloat16_chunk_gradients_in_float32(interpret, impl) -> None:
    """``grad_weight`` and ``grad_bias`` sum 64 chunks in float32, so they are as accurate as
    with one chunk. Summed in bfloat16, the relative error against float64 was 0.9% (weight)
    and 1.5% (bias), against 0.2-0.3% with one chunk."""
    n, hdim, vocab = 512, 16, 512
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(n, hdim, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen) * 0.1).bfloat16().requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.1).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=gen)
    ref = [t.detach().double().requires_grad_() for t in (h, w, b)]
    grads_ref = torch.autograd.grad(F.cross_entropy(ref[0] @ ref[1].T + ref[2], y), ref)
    errors = {}
    for chunk in (n, 8):
        loss = linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, impl=impl)
        grads = torch.autograd.grad(loss, (h, w, b))
        assert all(g.dtype == torch.bfloat16 for g in grads)
        errors[chunk] = [relative_error(g, r) for g, r in zip(grads, grads_ref, strict=True)]
    for one, many in zip(errors[n], errors[8], strict=True):
        assert one < 4e-3 and many < 5e-3, errors


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_cross_entropy_never_keeps_the_logits(interpret, impl) -> None:
    """Autograd keeps only the inputs and three numbers per row, not the [N, V] logits (the
    chunks, of at most N * H + 127 * V elements, are dropped). This is the recompute path; the
    three-product path holds the gradients instead (test_linear_ce_fused_grad.py)."""
    n, hdim, vocab = 256, 16, 8192
    h = torch.randn(n, hdim, requires_grad=True)
    w = torch.randn(vocab, hdim, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(h, w, y, impl=impl, recompute=True)
    logits_bytes = n * vocab * 4
    inputs_bytes = (h.numel() + w.numel()) * 4
    assert sum(saved) - inputs_bytes < logits_bytes / 100
    # The naive head saves the full logits (and more) for its backward.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(h @ w.T, y)
    assert sum(saved) - inputs_bytes >= logits_bytes
    loss.backward()
    assert h.grad is not None and w.grad is not None


@pytest.mark.parametrize(
    ("n", "h", "v"),
    [(8192, 4096, 32000), (8192, 4096, 128256), (8192, 64, 50257), (100, 16, 1000), (3, 8, 10)],
)
def test_default_chunks_fill_whole_matmul_tiles_within_the_budget(n, h, v) -> None:
    """Liger's ceil(N * H / V) rows (1049, 262, 11 at these sizes) rounded up to whole
    128-row tiles, at most N, and a chunk of logits within N * H + 127 * V elements."""
    rows = default_chunk_rows(n, h, v)
    assert rows == n or rows % CHUNK_ROWS == 0
    assert rows == n or rows >= math.ceil(n * h / v)
    assert rows <= n and rows * v <= n * h + (CHUNK_ROWS - 1) * v


def test_linear_cross_entropy_errors() -> None:
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="same H"):
        linear_cross_entropy(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(h, w, y, bias=torch.randn(9))
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy(h.double(), w, y)
    # Mixed float dtypes outside autocast: the error names both ways out.
    with pytest.raises(ValueError, match="share a dtype outside autocast") as info:
        linear_cross_entropy(h.bfloat16(), w, y)
    assert "hidden.to(weight.dtype)" in str(info.value)
    assert "torch.autocast('cpu'" in str(info.value)
    with pytest.raises(ValueError, match="bias must be float32, bfloat16 or float16"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear_cross_entropy(h, w, y, bias=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 10]))


def test_interpreter_set_after_triton_import_fails_clearly() -> None:
    """Triton binds its interpreter when first imported: a late TRITON_INTERPRET=1 must not
    crash inside the interpreter but say what to do (and ``auto`` falls back, warning)."""
    import os
    import subprocess
    import sys

    script = (
        "import os, warnings, torch, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from lightning_noise.kernels import cross_entropy\n"
        "x, y = torch.randn(2, 3), torch.tensor([0, 1])\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    cross_entropy(x, y)\n"
        "assert any('before Python starts' in str(w.message) for w in seen), seen\n"
        "try:\n"
        "    cross_entropy(x, y, impl='triton')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "before Python starts" in done.stdout


def _benchmark_module():
    """``benchmarks/kernels.py`` loaded as a module (it is a script, not a package), under a
    name that does not shadow the ``kernels`` package (tests/_bench.py)."""
    from _bench import import_benchmark

    return import_benchmark("kernels", module_name="bench_kernels")


def test_cpu_benchmark_checks_and_measures_memory() -> None:
    """benchmarks/kernels.py on the CPU: correctness rows within float32 error, and the head +
    loss's peak memory measured below the naive one's (a memory ratio, never a time)."""
    bench = _benchmark_module()
    rows = bench.main(
        ["--no-record", "--cpu-rows", "1024", "--cpu-hidden", "64", "--cpu-vocab", "16000"]
    )
    diffs = [value for case, metric, value in rows if metric == "max_abs_diff"]
    assert diffs and max(diffs) < 1e-5
    (ratio,) = [value for case, metric, value in rows if metric == "peak_ratio"]
    assert ratio < 0.5


def test_benchmark_times_each_run_from_a_cleared_gradient(interpret, monkeypatch) -> None:
    """The GPU benchmark's timed loop (run here on the CPU, wall clock) clears every input's
    ``.grad`` before each run, outside the timing: after warm-ups and repeats the gradient is
    one backward's, not the sum of five (each extra sum is one more ``N x C`` read and write
    in the timed region). Liger (a stand-in here; it is not installed) gets its own logits,
    restored before each run because Liger overwrites them with their gradient. The softmax
    bytes are what our kernels move: 8 N C for rows wider than one block, 5 N C otherwise."""
    import sys
    import types

    class FakeLigerLoss(torch.nn.Module):
        logits: torch.Tensor
        calls: list[tuple[bool, bool]] = []

        def forward(self, x, y):
            self.calls.append((x.grad is None, torch.equal(x.detach(), self.logits)))
            loss = F.cross_entropy(x, y)
            with torch.no_grad():
                x.zero_()  # as Liger writes the gradient over its input
            return loss

    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module.LigerCrossEntropyLoss = FakeLigerLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    bench = _benchmark_module()

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(16, 40, generator=gen, requires_grad=True)
    y = torch.randint(0, 40, (16,), generator=gen)
    FakeLigerLoss.logits = x.detach().clone()
    plain = {"ce": F.cross_entropy, "softmax": torch.softmax}
    losses, softmaxes, reset = bench.loss_providers(x, y, plain)
    assert set(losses) == {"ours", "torch eager", "torch.compile", "liger"}
    bench._time(losses.pop("liger"), 2, reset)  # its gradient goes to its own logits
    assert FakeLigerLoss.calls == [(True, True)] * 5  # 3 warm-ups + 2 timed runs
    for fn in (*losses.values(), *softmaxes.values()):
        reset()
        fn()
        once = x.grad.clone()
        bench._time(fn, 2, reset)
        torch.testing.assert_close(x.grad, once)

    h = torch.randn(12, 8, generator=gen, requires_grad=True)
    w = torch.randn(30, 8, generator=gen, requires_grad=True)
    providers, reset = bench.head_providers(h, w, torch.randint(0, 30, (12,), generator=gen))
    for fn in providers.values():
        reset()
        fn()
        once = (h.grad.clone(), w.grad.clone())
        bench._time(fn, 2, reset)
        torch.testing.assert_close((h.grad, w.grad), once)

    n = 8192
    assert bench.softmax_bytes(n, 1000, torch.bfloat16) == 5 * n * 1000 * 2
    assert bench.softmax_bytes(n, 8192, torch.bfloat16) == 5 * n * 8192 * 2
    assert bench.softmax_bytes(n, 32000, torch.bfloat16) == 8 * n * 32000 * 2
    assert bench.softmax_bytes(n, 4096, torch.float32) == 5 * n * 4096 * 4
    assert bench.softmax_bytes(n, 4097, torch.float32) == 8 * n * 4097 * 4
