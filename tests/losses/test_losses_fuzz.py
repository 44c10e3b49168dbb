"""Property tests (hypothesis) of every loss of :mod:`lightning_noise.losses` (issue 13).

On any leading shape, empty batches, all-ignored targets, NaN/inf logits, targets out of
range and wrong dtypes, a loss gives a clear ``ValueError``/``TypeError`` or a defined
result: the reductions agree with each other (``"mean"`` over no target is 0, the
documented convention), finite logits give a finite loss, and the cross-entropy family
equals PyTorch's ``F.cross_entropy`` (NaN where it gives NaN) on both implementations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_noise import losses as L

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy

FUZZ = settings(
    max_examples=30,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IGNORE = -100
SPECIAL = [math.nan, math.inf, -math.inf, 1e30, -1e30]
Tensor = torch.Tensor

#: name -> loss(logits, target, reduction); every functional loss with its defaults.
LOSSES = {
    "label_smoothing": lambda x, y, r: L.label_smoothing_cross_entropy(x, y, reduction=r),
    "label_smoothing_z": lambda x, y, r: L.label_smoothing_cross_entropy(
        x, y, 0.2, z_loss=1e-3, reduction=r
    ),
    "maxsup": lambda x, y, r: L.maxsup_cross_entropy(x, y, reduction=r),
    "gce": lambda x, y, r: L.generalized_cross_entropy(x, y, reduction=r),
    "rce": lambda x, y, r: L.reverse_cross_entropy(x, y, reduction=r),
    "sce": lambda x, y, r: L.symmetric_cross_entropy(x, y, reduction=r),
    "nce": lambda x, y, r: L.normalized_cross_entropy(x, y, reduction=r),
    "mae": lambda x, y, r: L.mean_absolute_error(x, y, reduction=r),
    "nce_rce": lambda x, y, r: L.nce_and_rce(x, y, reduction=r),
    "nce_mae": lambda x, y, r: L.nce_and_mae(x, y, reduction=r),
    "elr_eval": lambda x, y, r: L.ELRLoss(reduction=r).eval()(x, y),
}
NEEDS_TWO_CLASSES = {"nce", "nce_rce", "nce_mae"}


@st.composite
def batch(draw, nonfinite=True, max_classes=5):
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3), "lead"))
    num_classes = draw(st.integers(1, max_classes), "C")
    n = math.prod(lead) * num_classes
    finite = st.floats(-30, 30, width=32)
    special = nonfinite and draw(st.booleans())
    element = st.one_of(finite, st.sampled_from(SPECIAL)) if special else finite
    x = torch.tensor(np.array(draw(st.lists(element, min_size=n, max_size=n)), np.float32))
    good = st.one_of(st.integers(0, num_classes - 1), st.just(IGNORE))
    bad = st.sampled_from([-1, num_classes])
    tgt = st.one_of(good, bad) if draw(st.integers(0, 5)) == 0 else good
    m = math.prod(lead)
    y = torch.tensor(draw(st.lists(tgt, min_size=m, max_size=m)), dtype=torch.long)
    return x.reshape((*lead, num_classes)), y.reshape(lead)


def out_of_range(y: Tensor, num_classes: int) -> bool:
    kept = y[y != IGNORE]
    return bool(((kept < 0) | (kept >= num_classes)).any())


@pytest.mark.parametrize("name", list(LOSSES))
@FUZZ
@given(xy=batch(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_loss_fuzz(name, xy, dtype) -> None:
    x, y = xy
    x = x.to(dtype)
    loss = LOSSES[name]
    num_classes = x.shape[-1]
    if out_of_range(y, num_classes):
        with pytest.raises(ValueError, match="outside"):
            loss(x, y, "none")
        return
    if name in NEEDS_TWO_CLASSES and num_classes < 2:
        with pytest.raises(ValueError, match="at least 2 classes"):
            loss(x, y, "none")
        return
    rows = loss(x, y, "none")
    assert rows.shape == y.shape
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    valid = y != IGNORE
    assert bool((rows[~valid] == 0).all()), "ignored entries must give 0"
    total, mean = loss(x, y, "sum"), loss(x, y, "mean")
    torch.testing.assert_close(total, rows.sum(), equal_nan=True)
    torch.testing.assert_close(mean, rows.sum() / valid.sum().clamp_min(1), equal_nan=True)
    if not valid.any():
        assert float(mean) == 0.0 and float(total) == 0.0  # the documented convention
    moderate = x[valid].float()  # 1e30 is finite, but its z-loss 1e60 overflows (honestly)
    finite_in = bool(torch.isfinite(moderate).all()) and bool((moderate.abs() <= 1e4).all())
    if finite_in:
        assert bool(torch.isfinite(rows).all()), f"{name}: finite logits gave {rows}"


@pytest.mark.parametrize("impl", ["torch", "triton"])
@FUZZ
@given(xy=batch(), smoothing=st.sampled_from([0.0, 0.1, 1.0]), z=st.sampled_from([0.0, 1e-3]))
def test_cross_entropy_family_equals_pytorch_fuzz(impl, xy, smoothing, z) -> None:
    """Label smoothing (with z-loss) on both implementations equals PyTorch's cross-entropy,
    and MaxSup's PyTorch code equals the fused kernel, NaN and inf included."""
    x, y = xy
    if out_of_range(y, x.shape[-1]):
        return
    got = L.label_smoothing_cross_entropy(x, y, smoothing, z_loss=z, reduction="none", impl=impl)
    flat = x.reshape(-1, x.shape[-1])
    want = F.cross_entropy(
        flat, y.reshape(-1), ignore_index=IGNORE, label_smoothing=smoothing, reduction="none"
    )
    if z:
        want = want + z * torch.logsumexp(flat, -1) ** 2
    want = torch.where(y.reshape(-1) != IGNORE, want, 0.0).reshape(y.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    for alpha in (0.0, 0.15):
        ours = L.maxsup_cross_entropy(x, y, alpha, z_loss=z, reduction="none", impl="torch")
        fused = L.maxsup_cross_entropy(x, y, alpha, z_loss=z, reduction="none", impl=impl)
        torch.testing.assert_close(ours, fused, atol=1e-5, rtol=1e-5, equal_nan=True)


@FUZZ
@given(data=st.data())
def test_loss_bad_arguments_fuzz(data) -> None:
    name = data.draw(st.sampled_from(list(LOSSES)), "loss")
    case = data.draw(st.sampled_from(["int", "float_target", "shape", "scalar", "no_class",
                                      "list", "ignore_index", "reduction"]))  # fmt: skip
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    loss, reduction = LOSSES[name], "mean"
    if case == "int":
        x, match = x.long(), "floating point"
    elif case == "float_target":
        y, match = y.float(), "integer class indices"
    elif case == "shape":
        y, match = torch.tensor([0, 1]), "shape"
    elif case == "scalar":
        x, y, match = torch.randn(4), torch.tensor(0), r"\[N, C\]"
    elif case == "no_class":
        x, y, match = torch.randn(3, 0), torch.full((3,), IGNORE), "no classes"
    elif case == "list":
        x, match = x.tolist(), "tensors"
    elif case == "ignore_index":
        with pytest.raises(ValueError, match="ignore_index"):
            L.generalized_cross_entropy(x, y, ignore_index=None)
        return
    else:
        reduction, match = data.draw(st.sampled_from(["avg", None, "MEAN"])), "reduction"
    with pytest.raises((ValueError, TypeError), match=match):
        loss(x, y, reduction)


def test_normalized_cross_entropy_refuses_one_class() -> None:
    """Found by the fuzzing: with one class NCE was 0 / 0 = NaN for finite logits."""
    with pytest.raises(ValueError, match="at least 2 classes"):
        L.normalized_cross_entropy(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))


def test_maxsup_of_weight_zero_with_a_minus_inf_logit_is_cross_entropy() -> None:
    """Found by the fuzzing: ``alpha=0`` multiplied an infinite penalty, giving NaN where
    the cross-entropy is finite (or inf)."""
    x = torch.tensor([[1.0, 2.0, -math.inf], [-math.inf, 0.0, 1.0]])
    y = torch.tensor([1, 0])
    got = L.maxsup_cross_entropy(x, y, 0.0, reduction="none", impl="torch")
    torch.testing.assert_close(got, F.cross_entropy(x, y, reduction="none"))


@FUZZ
@given(xy=batch(nonfinite=True, max_classes=4), beta=st.sampled_from([0.0, 0.7]))
def test_elr_targets_never_record_non_finite_predictions(xy, beta) -> None:
    """A training step on NaN/inf logits gives a NaN loss (visible) but leaves the per-sample
    ELR targets finite: the bad samples keep their previous target."""
    x, y = xy
    if out_of_range(y, x.shape[-1]):
        return
    index = torch.arange(y.numel()).reshape(y.shape)
    elr = L.ELRLoss(beta=beta, lam=3.0, num_samples=max(y.numel(), 1), reduction="none").train()
    clean = torch.zeros_like(x)
    elr(clean, y, index=index)  # every kept sample's target: uniform
    before = elr.targets.clone()
    elr(x, y, index=index)
    after = elr.targets
    assert bool(torch.isfinite(after).all())
    flat, keep = x.reshape(-1, x.shape[-1]), (y != IGNORE).reshape(-1)
    bad = ~torch.isfinite(flat.softmax(-1)).all(-1)
    kept_before = before[: y.numel()][bad | ~keep]
    torch.testing.assert_close(after[: y.numel()][bad | ~keep], kept_before)


def test_elr_nan_logits_leave_the_targets_unchanged() -> None:
    """Found by the fuzzing: NaN logits wrote NaN into the sample's ELR target for good."""
    elr = L.ELRLoss(beta=0.7, lam=3.0, num_samples=2).train()
    y, index = torch.tensor([0, 1]), torch.tensor([0, 1])
    elr(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), y, index=index)
    before = elr.targets.clone()
    loss = elr(torch.tensor([[math.nan, 0.0], [0.0, 1.0]]), y, index=index)
    assert torch.isnan(loss)  # the loss says so
    torch.testing.assert_close(elr.targets[0], before[0])  # the target does not record it
    assert not torch.equal(elr.targets[1], before[1])  # the finite sample is updated
