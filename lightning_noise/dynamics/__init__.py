"""Per-sample training dynamics: the store that noisy-label methods read, and its callback."""

from lightning_noise.dynamics.callback import TrainingDynamics
from lightning_noise.dynamics.store import DynamicsStore

__all__ = ["DynamicsStore", "TrainingDynamics"]
