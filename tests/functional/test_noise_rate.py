"""The noise-rate estimate from a two-component mixture on per-sample losses."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from lightning_noise.functional import noise_rate as noise_rate_module
from lightning_noise.functional.noise_rate import estimate_noise_rate, fit_loss_mixture


def _mixture(n: int, rate: float, seed: int, *, spread: float = 0.25) -> torch.Tensor:
    """``n`` losses: ``round(rate * n)`` from N(2, spread), the rest from N(0.3, 0.15), shuffled."""
    g = torch.Generator().manual_seed(seed)
    n_high = round(rate * n)
    low = torch.randn(n - n_high, generator=g, dtype=torch.float64) * 0.15 + 0.3
    high = torch.randn(n_high, generator=g, dtype=torch.float64) * spread + 2.0
    values = torch.cat([low, high])
    return values[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.45, 0.6])
@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_estimate_recovers_the_known_proportion(rate: float, rule: str) -> None:
    for seed in range(3):
        loss = _mixture(4000, rate, seed)
        assert estimate_noise_rate(loss, rule=rule) == pytest.approx(rate, abs=0.01)


def test_fit_recovers_the_components_and_orders_them() -> None:
    loss = _mixture(5000, 0.3, seed=1)
    mixture = fit_loss_mixture(loss, normalize=False)
    assert mixture.converged
    assert mixture.weights[1] == pytest.approx(0.3, abs=0.01)
    assert mixture.means[0] == pytest.approx(0.3, abs=0.01)
    assert mixture.means[1] == pytest.approx(2.0, abs=0.02)
    # reg_covar is added to each variance.
    assert mixture.variances[0] == pytest.approx(0.15**2 + 5e-4, rel=0.1)
    assert mixture.variances[1] == pytest.approx(0.25**2 + 5e-4, rel=0.1)
    assert sum(mixture.weights) == pytest.approx(1.0)
    # Normalising rescales the means and variances but not the posteriors.
    scaled = fit_loss_mixture(loss * 7 + 3, normalize=True, reg_covar=1e-12)
    plain = fit_loss_mixture(loss, normalize=True, reg_covar=1e-12)
    assert torch.allclose(scaled.posterior_high, plain.posterior_high, atol=1e-6)


def test_overlapping_components_posterior_vs_mean() -> None:
    # Wide, overlapping groups: each rule stays near the truth; the one rule the callers use
    # by default ("posterior") is the fraction on the high side of the 1/2 posterior.
    loss = _mixture(3000, 0.4, seed=2, spread=0.7)
    mixture = fit_loss_mixture(loss)
    by_post = estimate_noise_rate(loss)
    assert by_post == pytest.approx(float((mixture.posterior_high > 0.5).double().mean()))
    assert by_post == pytest.approx(0.4, abs=0.03)
    # At the EM fixed point (run to convergence, not DivideMix's 10 iterations) the mean
    # posterior is the high component's weight.
    converged = {"max_iter": 1000, "tol": 1e-12}
    mixture = fit_loss_mixture(loss, **converged)
    assert mixture.converged
    mean = estimate_noise_rate(loss, rule="mean", **converged)
    assert mean == pytest.approx(mixture.weights[1], abs=1e-6)
    assert mean == pytest.approx(0.4, abs=0.03)


def test_non_finite_losses_are_ignored_and_the_fit_is_deterministic() -> None:
    loss = _mixture(1000, 0.25, seed=3).float()
    with_nan = torch.cat([loss, torch.tensor([math.nan, math.inf, math.nan])])
    assert estimate_noise_rate(with_nan) == estimate_noise_rate(loss)
    assert fit_loss_mixture(with_nan).posterior_high.shape == (1000,)
    # Same losses in, same numbers out (every DDP rank fits the same gathered store).
    a, b = fit_loss_mixture(loss), fit_loss_mixture(loss.clone())
    assert (a.weights, a.means, a.variances) == (b.weights, b.means, b.variances)
    assert torch.equal(a.posterior_high, b.posterior_high)


def test_degenerate_and_bad_input() -> None:
    assert estimate_noise_rate(torch.full((10,), 0.7)) == 0.0
    with pytest.raises(ValueError, match="at least 2 finite losses"):
        estimate_noise_rate(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="1-D"):
        fit_loss_mixture(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="rule"):
        estimate_noise_rate(torch.rand(10), rule="median")
    with pytest.raises(ValueError, match="reg_covar"):
        fit_loss_mixture(torch.rand(10), reg_covar=0.0)


def test_doctests() -> None:
    assert doctest.testmod(noise_rate_module, raise_on_error=True).failed == 0
