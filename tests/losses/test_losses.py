"""Tests for label smoothing, MaxSup and the robust losses.

References are computed here independently of the library, in float64 and from the papers'
formulas written in matrix form (one-hot targets, explicit sums), and compared in value and in
gradient (through autograd). Label smoothing is also compared with PyTorch's own
``cross_entropy(..., label_smoothing=eps)``.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import lightning_noise.losses as losses
import lightning_noise.losses.robust as robust_module
import lightning_noise.losses.smoothing as smoothing_module

C = 7


def batch(shape=(13,), classes=C, seed=0, dtype=torch.float64, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, classes, generator=gen) * scale).to(dtype)
    target = torch.randint(classes, shape, generator=gen)
    return logits, target


def onehot(target, classes=C):
    return F.one_hot(target, classes).double()


def value_and_grad(fn, logits, target):
    z = logits.clone().requires_grad_(True)
    out = fn(z, target)
    (grad,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), grad


def assert_same(fn, reference, logits, target, **tol):
    got, got_grad = value_and_grad(fn, logits, target)
    want, want_grad = value_and_grad(reference, logits, target)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)


# ---------------------------------------------------------------------- references (per entry)
def ref_probs(z):
    return torch.exp(z - torch.logsumexp(z, dim=-1, keepdim=True))


def ref_gce(z, y, q):
    p = ref_probs(z).clamp(1e-7, 1.0)
    return (1 - (onehot(y) * p).sum(-1) ** q) / q


def ref_rce(z, y, A):
    # -sum_k p_k log(y_k) with log(0) := A and log(1) = 0 (Wang et al. 2019, eq. 4)
    p = ref_probs(z).clamp(1e-7, 1.0)
    log_label = torch.where(onehot(y) == 1, torch.zeros(()), torch.full((), A)).double()
    return -(p * log_label).sum(-1)


def ref_ce(z, y):
    return -(onehot(y) * torch.log(ref_probs(z))).sum(-1)


def ref_nce(z, y):
    log_p = torch.log(ref_probs(z))
    return (onehot(y) * -log_p).sum(-1) / (-log_p).sum(-1)


def ref_mae(z, y):
    # half the L1 distance between p and the one-hot label (the official APL code's form)
    return (ref_probs(z) - onehot(y)).abs().sum(-1) / 2


def ref_smoothed(z, y, eps):
    q = (1 - eps) * onehot(y) + eps / C
    return -(q * torch.log(ref_probs(z))).sum(-1)


def ref_maxsup(z, y, alpha):
    return ref_ce(z, y) + alpha * (z.max(-1).values - z.sum(-1) / C)


ROBUST = {
    "gce": (lambda z, y: losses.generalized_cross_entropy(z, y, 0.7, reduction="none"),
            lambda z, y: ref_gce(z, y, 0.7)),
    "gce_q1": (lambda z, y: losses.generalized_cross_entropy(z, y, 1.0, reduction="none"),
               lambda z, y: ref_gce(z, y, 1.0)),
    # Default A: the official code's ln(1e-4); the paper's A = -4 by name.
    "rce": (lambda z, y: losses.reverse_cross_entropy(z, y, reduction="none"),
            lambda z, y: ref_rce(z, y, math.log(1e-4))),
    "rce_paper": (
        lambda z, y: losses.reverse_cross_entropy(
            z, y, log_zero=robust_module.PAPER_LOG_ZERO, reduction="none"
        ),
        lambda z, y: ref_rce(z, y, -4.0),
    ),
    "sce": (lambda z, y: losses.symmetric_cross_entropy(z, y, 0.1, 1.0, reduction="none"),
            lambda z, y: 0.1 * ref_ce(z, y) + 1.0 * ref_rce(z, y, math.log(1e-4))),
    "sce_paper": (
        lambda z, y: losses.symmetric_cross_entropy(
            z, y, 6.0, 0.1, log_zero=-4.0, reduction="none"
        ),
        lambda z, y: 6.0 * ref_ce(z, y) + 0.1 * ref_rce(z, y, -4.0),
    ),
    "nce": (lambda z, y: losses.normalized_cross_entropy(z, y, reduction="none"), ref_nce),
    "mae": (lambda z, y: losses.mean_absolute_error(z, y, reduction="none"), ref_mae),
    "nce+rce": (lambda z, y: losses.nce_and_rce(z, y, 1.0, 1.0, reduction="none"),
                lambda z, y: ref_nce(z, y) + ref_rce(z, y, math.log(1e-4))),
    "nce+rce_c100": (lambda z, y: losses.nce_and_rce(z, y, 10.0, 0.1, reduction="none"),
                     lambda z, y: 10 * ref_nce(z, y) + 0.1 * ref_rce(z, y, math.log(1e-4))),
    "nce+rce_paper": (
        lambda z, y: losses.nce_and_rce(z, y, 1.0, 1.0, log_zero=-4.0, reduction="none"),
        lambda z, y: ref_nce(z, y) + ref_rce(z, y, -4.0),
    ),
    "nce+mae": (lambda z, y: losses.nce_and_mae(z, y, 1.0, 1.0, reduction="none"),
                lambda z, y: ref_nce(z, y) + ref_mae(z, y)),
    "label_smoothing": (
        lambda z, y: losses.label_smoothing_cross_entropy(z, y, 0.1, reduction="none"),
        lambda z, y: ref_smoothed(z, y, 0.1),
    ),
    "maxsup": (lambda z, y: losses.maxsup_cross_entropy(z, y, 0.15, reduction="none"),
               lambda z, y: ref_maxsup(z, y, 0.15)),
}  # fmt: skip


def test_doctests() -> None:
    for module in (smoothing_module, robust_module):
        assert doctest.testmod(module, raise_on_error=True).failed == 0


@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_loss_matches_its_paper_formula_in_value_and_gradient(name, scale) -> None:
    fn, reference = ROBUST[name]
    logits, target = batch(scale=scale, seed=int(scale * 10))
    assert_same(fn, reference, logits, target)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_any_leading_shape_equals_the_flattened_batch(name) -> None:
    fn, _ = ROBUST[name]
    logits, target = batch(shape=(3, 4, 5))
    got = fn(logits, target)
    assert got.shape == (3, 4, 5)
    flat = fn(logits.reshape(-1, C), target.reshape(-1))
    torch.testing.assert_close(got.reshape(-1), flat)


# ---------------------------------------------------------------------- official RCE code
def official_rce(pred, labels, num_classes=C):
    """``ReverseCrossEntropy.forward`` of HanxunH/Active-Passive-Losses ``loss.py`` (SCELoss's
    RCE term is the same lines), transcribed: the one-hot label is clamped at 1e-4."""
    pred = F.softmax(pred, dim=1)
    pred = torch.clamp(pred, min=1e-7, max=1.0)
    label_one_hot = F.one_hot(labels, num_classes).to(pred.dtype)
    label_one_hot = torch.clamp(label_one_hot, min=1e-4, max=1.0)
    return -1 * torch.sum(pred * torch.log(label_one_hot), dim=1)


def official_nce(pred, labels):
    """``NormalizedCrossEntropy.forward`` of the same file (before its ``.mean()``)."""
    pred = F.log_softmax(pred, dim=1)
    label_one_hot = F.one_hot(labels, pred.shape[1]).to(pred.dtype)
    return -1 * torch.sum(label_one_hot * pred, dim=1) / (-pred.sum(dim=1))


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_rce_defaults_are_the_official_code(scale) -> None:
    """SCELoss(alpha, beta), ReverseCrossEntropy and NCEandRCE(alpha, beta) of the official
    code, with their defaults: our functions and modules with theirs (A = ln(1e-4))."""
    logits, target = batch(scale=scale, seed=3)

    def sce(z, y):  # SCELoss.forward: alpha * CE + beta * RCE.mean()
        return 0.1 * F.cross_entropy(z, y) + 1.0 * official_rce(z, y).mean()

    def apl(z, y):  # NCEandRCE(alpha=1, beta=1): scale * loss.mean() of each
        return 1.0 * official_nce(z, y).mean() + 1.0 * official_rce(z, y).mean()

    assert_same(losses.symmetric_cross_entropy, sce, logits, target)
    assert_same(losses.SymmetricCrossEntropy(), sce, logits, target)
    rce = lambda z, y: official_rce(z, y).mean()  # noqa: E731
    assert_same(losses.reverse_cross_entropy, rce, logits, target)
    assert_same(losses.ReverseCrossEntropy(), rce, logits, target)
    assert_same(losses.nce_and_rce, apl, logits, target)
    assert_same(losses.NCEandRCE(), apl, logits, target)
    # The paper's A = -4 is 4 / 9.21 = 0.434 of it (the "2.30x smaller").
    paper = losses.ReverseCrossEntropy(log_zero=robust_module.PAPER_LOG_ZERO)(logits, target)
    ratio = float(losses.reverse_cross_entropy(logits, target) / paper)
    assert ratio == pytest.approx(-math.log(1e-4) / 4.0, rel=1e-12)
    assert robust_module.OFFICIAL_LOG_ZERO == math.log(1e-4)


# ---------------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_smoothing_is_pytorchs(eps, reduction, dtype) -> None:
    logits, target = batch(shape=(4, 6), dtype=dtype)
    target[0, :3] = -100  # ignored entries

    def ours(z, y):
        return losses.label_smoothing_cross_entropy(z, y, eps, reduction=reduction)

    def torchs(z, y):
        # PyTorch puts classes in dim 1: move them there.
        return F.cross_entropy(z.movedim(-1, 1), y, label_smoothing=eps, reduction=reduction)

    assert_same(ours, torchs, logits, target)


def test_label_smoothing_module_and_ignore_index() -> None:
    logits, target = batch(shape=(10,))
    target[::3] = 5
    module = losses.LabelSmoothingCrossEntropy(0.2, ignore_index=5)
    want = F.cross_entropy(logits, target, label_smoothing=0.2, ignore_index=5)
    torch.testing.assert_close(module(logits, target), want)


def test_label_smoothing_is_ce_plus_the_gt_logit_penalty() -> None:
    # MaxSup paper, eq. 5: LS = CE + eps * (z_gt - mean_k z_k); MaxSup swaps z_gt for z_max.
    logits, target = batch(shape=(50,))
    ls = losses.label_smoothing_cross_entropy(logits, target, 0.1, reduction="none")
    z_gt = logits.gather(1, target[:, None]).squeeze(1)
    decomposed = F.cross_entropy(logits, target, reduction="none") + 0.1 * (z_gt - logits.mean(-1))
    torch.testing.assert_close(ls, decomposed)
    maxsup = losses.maxsup_cross_entropy(logits, target, 0.1, reduction="none")
    right = logits.argmax(-1) == target
    assert right.any() and (~right).any()
    torch.testing.assert_close(maxsup[right], ls[right])  # same where the top-1 is the label
    assert (maxsup[~right] > ls[~right]).all()  # MaxSup penalises a wrong top-1 more


def test_all_ignored_batch_gives_zero_not_nan() -> None:
    logits, target = batch(shape=(6,))
    target[:] = -100
    for name, (fn, _) in ROBUST.items():
        out = fn(logits, target)
        assert torch.equal(out, torch.zeros(6, dtype=out.dtype)), name
    for reduction in ("mean", "sum"):
        value = losses.nce_and_rce(logits, target, reduction=reduction)
        assert float(value) == 0.0


# ---------------------------------------------------------------------- z-loss
@pytest.mark.parametrize("fn", [losses.label_smoothing_cross_entropy, losses.maxsup_cross_entropy])
def test_z_loss_adds_the_squared_log_partition(fn) -> None:
    logits, target = batch(shape=(9,))
    base = fn(logits, target, 0.1, reduction="none")
    with_z = fn(logits, target, 0.1, z_loss=1e-2, reduction="none")
    lse = torch.log(torch.exp(logits).sum(-1))
    torch.testing.assert_close(with_z - base, 1e-2 * lse**2)


# ---------------------------------------------------------------------- MaxSup schedule
def test_maxsup_alpha_is_the_official_linear_ramp() -> None:
    epochs = 90
    official = [0.1 + 0.1 * epoch / (epochs - 1) for epoch in range(epochs)]
    ours = [losses.maxsup_alpha(epoch, epochs) for epoch in range(epochs)]
    assert ours == pytest.approx(official, abs=1e-15)
    loss = losses.MaxSupLoss()
    loss.set_progress(44, epochs)
    assert loss.alpha == pytest.approx(official[44])
    constant = losses.MaxSupLoss(0.3, alpha_end=None)
    constant.set_progress(10, None)
    assert constant.alpha == 0.3
    with pytest.raises(ValueError, match="max_epochs"):
        loss.set_progress(3, None)


# ---------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype) -> None:
    logits, target = batch(dtype=torch.float32, scale=1.0)
    for name, (fn, _) in ROBUST.items():
        half = fn(logits.to(dtype), target)
        assert half.dtype == torch.float32, name
        full = fn(logits.to(dtype).float(), target)
        torch.testing.assert_close(half, full, msg=name)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: losses.generalized_cross_entropy(*batch(), q=0.0), r"q must be in \(0.0"),
        (lambda: losses.label_smoothing_cross_entropy(*batch(), 1.5), "smoothing must be in"),
        (lambda: losses.symmetric_cross_entropy(*batch(), log_zero=1.0), "log_zero"),
        (lambda: losses.nce_and_mae(*batch(), reduction="avg"), "reduction must be one of"),
        (lambda: losses.mean_absolute_error(torch.zeros(3), torch.zeros(3).long()), "classes last"),
        (lambda: losses.mean_absolute_error(torch.zeros(3, C), torch.zeros(3)), "integer class"),
        (lambda: losses.mean_absolute_error(torch.zeros(3, C), torch.zeros(4).long()), "shape"),
        (lambda: losses.mean_absolute_error(torch.zeros(3, C), torch.full((3,), C)), "outside"),
        (lambda: losses.MaxSupLoss(alpha=-1.0), "alpha must be in"),
        (lambda: losses.ELRLoss(beta=1.0), "beta must be in"),
        (lambda: losses.ELRLoss(num_samples=0), "num_samples"),
    ],
)
def test_bad_input_raises_naming_the_fix(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()
