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
    "at_last_train_batch",
    "attached_trainer",
    "can_reload_train_dataloader",
    "checkpoint_as_epoch_finished",
    "mark_step_non_finite",
    "metrics_restored",
    "optimizer_unscales_itself",
    "reload_train_dataloader",
    "saved_as_epoch_finished",
    "start_epoch_as_new",
]


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (``module.trainer`` raises
    outside a fit instead of returning ``None``)."""
    return getattr(module, "_trainer", None)


def at_last_train_batch(trainer: Any) -> bool:
    """Whether the training batch now running is the last of its epoch.

    Read from the fit loop's batch progress (``is_last_batch`` is set before the batch runs;
    ``current.ready`` counts the batches of this epoch so far).
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches


def checkpoint_as_epoch_finished(checkpoint: dict[str, Any]) -> None:
    """Rewrite a checkpoint saved in ``on_train_epoch_end`` as one saved after that epoch.

    Lightning (2.4-2.6) resumes a checkpoint saved in ``on_train_epoch_end`` by running the
    epoch's end again (the epoch's LR scheduler step and ``on_train_epoch_end`` hooks) and
    then gives the next epoch's sampler an epoch number one too high; a resumable training
    loader restored there is also at the end of its iteration. After this rewrite the fit
    loop's state says the epoch is complete (``completed = processed``), the epoch loop's
    per-epoch counters are at zero, and no loader state is kept: at an epoch boundary the
    loader's position says nothing, and the next epoch starts its order afresh from
    ``(seed, epoch)``. Lightning then resumes at the next epoch's start, as a run that never
    stopped goes on.
    """
    fit = checkpoint["loops"]["fit_loop"]
    for counters in fit["epoch_progress"].values():
        counters["completed"] = counters["processed"]
    for key, value in fit.items():
        if key.startswith("epoch_loop.") and not key.startswith("epoch_loop.val_loop."):
            _zero_current(value)
    fit["epoch_loop.batch_progress"]["is_last_batch"] = False
    fit["state_dict"].pop("combined_loader", None)
    checkpoint[_EPOCH_FINISHED] = True


#: Set in a checkpoint rewritten by :func:`checkpoint_as_epoch_finished`.
_EPOCH_FINISHED = "lightning_noise_epoch_finished"


def saved_as_epoch_finished(checkpoint: dict[str, Any]) -> bool:
    """Whether :func:`checkpoint_as_epoch_finished` wrote this checkpoint."""
    return bool(checkpoint.get(_EPOCH_FINISHED, False))


def start_epoch_as_new(trainer: Any) -> None:
    """Run the epoch now starting as a fresh one, not as the rest of a restored one.

    For a run resumed from a :func:`checkpoint_as_epoch_finished` checkpoint, called at the
    first ``on_train_epoch_start``: without it the epoch loop, still marked as restarting,
    takes the restored "last batch done" counters for a validation it must skip and counts
    one batch more for the loggers' step.
    """
    trainer.fit_loop.epoch_loop.restarting = False


def _zero_current(state: Any) -> None:
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "current" and isinstance(value, dict):
                state[key] = {name: 0 for name in value}
            else:
                _zero_current(value)


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


def assert_on_device(condition: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the one-element bool ``condition`` is true, without
    a host synchronisation on an accelerator.

    On the CPU the check runs at once (its value is already on the host: no queue to stall) and
    raises ``ValueError``. On CUDA it is ``torch._assert_async``: a device-side assert queued
    behind the kernels that compute ``condition``; when it fails the process sees a CUDA error
    naming a device-side assert at its next synchronisation (the CUDA context is then unusable,
    as with torch's own index checks), so bad input still stops training, only later.
    """
    if condition.device.type == "cpu":
        # The CPU's value is read here: torch._assert_async would read it the same way.
        try:
            torch._assert_async(condition, message)
        except RuntimeError as error:
            raise ValueError(message) from error
    else:
        torch._assert_async(condition, message)


def unscale_grads_marking_non_finite(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer
) -> None:
    """Divide the optimizer's gradients by the grad scaler's scale in place and record a
    non-finite result in the scaler's record of this step, all on the device (no host sync).

    For a second backward after ``scaler.unscale_(optimizer)`` already ran on this step (the
    scaler allows one ``unscale_`` a step): it uses the same fused op as ``unscale_``
    (``torch._amp_foreach_non_finite_check_and_unscale_``), which only ever sets the record to
    "non-finite", so a step already marked stays marked; ``scaler.step`` then skips the
    optimizer and ``scaler.update`` lowers the scale.
    """
    found_per_device = scaler._found_inf_per_device(optimizer)
    inv_scale = scaler._scale.double().reciprocal().float()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (device, _), grads in groups.items():
        found = found_per_device.get(device)
        if found is None:  # a device unscale_ saw no gradient on: start its record now
            found = found_per_device[device] = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(device))
