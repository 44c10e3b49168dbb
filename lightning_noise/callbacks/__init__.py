"""Callbacks a user adds to an existing Trainer: one method a file."""

from lightning_noise.callbacks.gradient_noise import GradientNoise
from lightning_noise.callbacks.sam import ASAM, FSAM, SAM

__all__ = ["ASAM", "FSAM", "SAM", "GradientNoise"]
