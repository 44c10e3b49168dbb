"""Every access to private Lightning, torch and torchmetrics state, in one place.

The library's methods need a few things that these libraries keep private. Each access lives
here, named for what it does, and ``tests/test_compat.py`` pins it to the supported versions
(``lightning>=2.4``, ``torch>=2.6``, ``torchmetrics>=1.4``): when a release moves one of these,
that test fails first and names the function to update. Nothing else in the package touches a
leading-underscore attribute of another library's object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "attached_trainer",
    "can_reload_train_dataloader",
    "mark_step_non_finite",
    "metrics_restored",
    "optimizer_unscales_itself",
    "reload_train_dataloader",
]


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (``module.trainer`` raises
    outside a fit instead of returning ``None``)."""
    return getattr(module, "_trainer", None)


def can_reload_train_dataloader(trainer: Any) -> bool:
    """Whether :func:`reload_train_dataloader` works on this Lightning version."""
    return hasattr(getattr(trainer, "fit_loop", None), "_combined_loader")


def reload_train_dataloader(trainer: Any) -> None:
    """Make the fit loop request a new training loader at the next epoch start.

    Lightning 2.x has no public call for this mid-fit: the fit loop builds its loader again
    when it holds none. (``reload_dataloaders_every_n_epochs`` would rebuild it every epoch.)
    """
    trainer.fit_loop._combined_loader = None


def optimizer_unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer unscales inside its own ``step`` (torch's fused optimizers set
    ``_step_supports_amp_scaling``), so the grad scaler never unscales its gradients."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def mark_step_non_finite(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Record this step's gradients as non-finite, so that ``scaler.step`` skips the optimizer
    and ``scaler.update`` lowers the scale (the scaler has no public setter for this record)."""
    for found_inf in scaler._found_inf_per_device(optimizer).values():
        found_inf.fill_(1.0)


@contextlib.contextmanager
def metrics_restored(module: nn.Module) -> Iterator[None]:
    """Put every torchmetrics ``Metric`` in ``module`` back to its state on exit.

    Restores the metric states and the update count and cached result that torchmetrics keeps
    privately, so that a re-run of ``training_step`` (SAM's second pass) counts no sample twice.
    """
    from torchmetrics import Metric

    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            state = {
                k: (v.clone() if isinstance(v, Tensor) else list(v))
                for k, v in metric.metric_state.items()
            }
            saved.append((metric, state, metric._update_count, metric._computed))
    try:
        yield
    finally:
        for metric, state, count, computed in saved:
            for key, value in state.items():
                setattr(metric, key, value)
            metric._update_count = count
            metric._computed = computed
