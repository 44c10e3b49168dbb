"""The noise rate of a training set, estimated from its per-sample losses (torch only).

Early in training, before a network memorises the noisy labels, the per-sample losses of a
noisily labelled training set form two groups: the clean labels, already fitted (small loss),
and the noisy ones, not yet fitted (large loss). DivideMix (Li, Socher, Hoi, "DivideMix:
Learning with Noisy Labels as Semi-supervised Learning", ICLR 2020, Sec. 3.1) fits a
two-component Gaussian mixture to the losses, normalised to ``[0, 1]``, and reads each
sample's posterior probability of the low-loss component as its probability of being clean.
Here the same fit gives the *fraction* of noisy labels: the share of samples whose posterior
of the high-loss component exceeds 1/2 (:func:`estimate_noise_rate`). Co-teaching's forget
rate, small-loss selection and the label audit's budget can then be set without knowing the
true noise rate.

:func:`fit_loss_mixture` is our own expectation-maximisation in float64 on the CPU, so every
DDP rank fitting the same losses gets the same numbers. It is initialised deterministically by
two-means in one dimension (as scikit-learn's ``GaussianMixture`` initialises by k-means,
which DivideMix's official code uses), and adds ``reg_covar`` to each variance as
scikit-learn does. Its defaults are DivideMix's official settings (``max_iter=10``,
``tol=1e-2``, ``reg_covar=5e-4`` on losses normalised to ``[0, 1]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_noise._validate import check_choice, check_int, check_number

__all__ = ["ESTIMATE_RULES", "LossMixture", "estimate_noise_rate", "fit_loss_mixture"]

#: How :func:`estimate_noise_rate` turns the mixture into a rate.
ESTIMATE_RULES = ("posterior", "mean")


@dataclass(frozen=True)
class LossMixture:
    """A two-component Gaussian mixture fitted to per-sample losses.

    Component 0 has the lower mean (the clean labels), component 1 the higher (the noisy
    ones). Means and variances are on the scale the mixture was fitted on (normalised to
    ``[0, 1]`` when :func:`fit_loss_mixture` normalises).

    Attributes:
        weights: ``(low, high)`` mixing weights, summing to 1.
        means: ``(low, high)`` component means, ``low <= high``.
        variances: ``(low, high)`` component variances (``reg_covar`` included).
        posterior_high: ``[N]`` float64 posterior probability of the high-loss component for
            each finite input loss (the non-finite ones are left out, in order).
        iterations: EM iterations run.
        converged: whether the mean log-likelihood changed by less than ``tol``.
    """

    weights: tuple[float, float]
    means: tuple[float, float]
    variances: tuple[float, float]
    posterior_high: Tensor
    iterations: int
    converged: bool


def _two_means(x: Tensor, max_iter: int = 100) -> Tensor:
    """``[N]`` bool: the upper of two clusters found by one-dimensional two-means (Lloyd)."""
    cut = x.median()
    upper = x > cut
    for _ in range(max_iter):
        if bool(upper.all()) or not bool(upper.any()):
            break
        cut = (x[~upper].mean() + x[upper].mean()) / 2
        new = x > cut
        if bool((new == upper).all()):
            break
        upper = new
    return upper


def fit_loss_mixture(
    loss: Tensor,
    *,
    normalize: bool = True,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
) -> LossMixture:
    """Fit a two-component one-dimensional Gaussian mixture to per-sample losses by EM.

    Args:
        loss: ``[N]`` per-sample losses; non-finite entries (e.g. NaN for samples never seen)
            are ignored.
        normalize: rescale the losses to ``[0, 1]`` (min-max) first, as DivideMix does, so
            that ``reg_covar`` has one meaning whatever the loss's scale.
        max_iter: most EM iterations, >= 1. DivideMix's official code stops after 10
            (scikit-learn's ``GaussianMixture(max_iter=10, tol=1e-2)``), the default: on
            noisy losses whose groups overlap, EM run to convergence wanders from the
            two-means start to a narrow component inside the spread (measured on digits at
            60% symmetric noise: 200 iterations gave 0.04-0.51 from epoch to epoch, 10 gave
            0.18-0.43; RESULTS.md).
        tol: stop when the mean log-likelihood per sample changes by less than this, >= 0
            (DivideMix: 1e-2).
        reg_covar: added to each variance, > 0 (keeps a component from collapsing onto one
            value; DivideMix uses 5e-4).

    Returns:
        The :class:`LossMixture`, components ordered by mean.

    Raises:
        ValueError: for fewer than two finite losses, or a ``loss`` that is not 1-D.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> loss = torch.cat([torch.randn(700, generator=g) * 0.1 + 0.2,
        ...                   torch.randn(300, generator=g) * 0.3 + 2.0])
        >>> mixture = fit_loss_mixture(loss)
        >>> round(mixture.weights[1], 2)
        0.3
    """
    if not isinstance(loss, Tensor) or loss.dim() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a 1-D tensor of per-sample losses, got {shape}")
    check_int("max_iter", max_iter, minimum=1)
    check_number("tol", tol, low=0.0)
    check_number("reg_covar", reg_covar, low=0.0, low_open=True)
    x = loss.detach().to("cpu", torch.float64)
    x = x[torch.isfinite(x)]
    if x.numel() < 2:
        raise ValueError(
            f"fitting a two-component mixture needs at least 2 finite losses, got {x.numel()} "
            "(were any samples recorded?)"
        )
    lo, hi = float(x.min()), float(x.max())
    if normalize:
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)

    upper = _two_means(x)
    if bool(upper.all()) or not bool(upper.any()):  # all losses equal: nothing to separate
        post = torch.zeros_like(x)
        var = float(x.var(unbiased=False)) + reg_covar
        mean = float(x.mean())
        return LossMixture((1.0, 0.0), (mean, mean), (var, var), post, 0, True)
    # Initial responsibilities from the two clusters, then EM (Dempster, Laird, Rubin 1977).
    resp = torch.stack([(~upper).double(), upper.double()], dim=1)  # [N, 2]
    previous = -math.inf
    converged = False
    iterations = 0
    log_2pi = math.log(2 * math.pi)
    for iterations in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
        # M step.
        counts = resp.sum(dim=0) + 10 * torch.finfo(torch.float64).eps
        weights = counts / x.numel()
        means = (resp * x[:, None]).sum(dim=0) / counts
        variances = (resp * (x[:, None] - means) ** 2).sum(dim=0) / counts + reg_covar
        # E step, in log space.
        log_prob = weights.log() - 0.5 * (
            log_2pi + variances.log() + (x[:, None] - means) ** 2 / variances
        )  # [N, 2]
        log_norm = torch.logsumexp(log_prob, dim=1)
        resp = (log_prob - log_norm[:, None]).exp()
        mean_ll = float(log_norm.mean())
        if abs(mean_ll - previous) < tol:
            converged = True
            break
        previous = mean_ll
    order = [0, 1] if float(means[0]) <= float(means[1]) else [1, 0]
    return LossMixture(
        weights=(float(weights[order[0]]), float(weights[order[1]])),
        means=(float(means[order[0]]), float(means[order[1]])),
        variances=(float(variances[order[0]]), float(variances[order[1]])),
        posterior_high=resp[:, order[1]].contiguous(),
        iterations=iterations,
        converged=converged,
    )


def estimate_noise_rate(loss: Tensor, *, rule: str = "posterior", **fit_kwargs: Any) -> float:
    """The fraction of noisy labels, from a two-component mixture on the per-sample losses.

    Fits :func:`fit_loss_mixture` (DivideMix's mixture, Li et al. 2020) and returns

    * ``rule="posterior"`` (default): the fraction of samples whose posterior probability of
      the high-loss component exceeds 1/2, i.e. the share DivideMix's split at 0.5 would
      call noisy;
    * ``rule="mean"``: the mean posterior of the high-loss component (at the EM fixed point,
      the high-loss component's mixing weight).

    The estimate is only as good as the losses are separated: take them early in training,
    before the network memorises the noisy labels (memorised noisy labels have small losses
    too); losses of a clean training set, which form one group, still split in two (the
    estimate is then not 0).

    Args:
        loss: ``[N]`` per-sample losses; non-finite entries are ignored.
        rule: ``"posterior"`` or ``"mean"``.
        **fit_kwargs: passed to :func:`fit_loss_mixture`.

    Returns:
        The estimated noise rate, in ``[0, 1]``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> loss = torch.cat([torch.rand(600, generator=g) * 0.5,
        ...                   2.0 + torch.rand(400, generator=g)])
        >>> estimate_noise_rate(loss)
        0.4
    """
    rule = check_choice("rule", rule, ESTIMATE_RULES)
    mixture = fit_loss_mixture(loss, **fit_kwargs)
    post = mixture.posterior_high
    if rule == "posterior":
        return float((post > 0.5).double().mean())
    return float(post.mean())
