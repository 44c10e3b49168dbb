"""Callbacks a user adds to an existing Trainer: one method a file."""

from lightning_noise.callbacks.checkpoint import ResumableCheckpoint
from lightning_noise.callbacks.gradient_noise import GradientNoise
from lightning_noise.callbacks.kernels import KernelSwap
from lightning_noise.callbacks.label_audit import LabelAudit
from lightning_noise.callbacks.late_stopping import LateStopping
from lightning_noise.callbacks.noisefit import NoiseFiT
from lightning_noise.callbacks.nonfinite import NonFiniteGuard
from lightning_noise.callbacks.policy import SamplePolicyCallback
from lightning_noise.callbacks.sam import ASAM, FSAM, SAM
from lightning_noise.callbacks.sample_selection import AdaptiveK, SmallLossSelection

__all__ = [
    "ASAM",
    "FSAM",
    "SAM",
    "AdaptiveK",
    "GradientNoise",
    "KernelSwap",
    "LabelAudit",
    "LateStopping",
    "NoiseFiT",
    "NonFiniteGuard",
    "ResumableCheckpoint",
    "SamplePolicyCallback",
    "SmallLossSelection",
]
