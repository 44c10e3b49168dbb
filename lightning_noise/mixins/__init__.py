"""LightningModule mixins: per-sample loss reduction (and, later, co-teaching)."""

from lightning_noise.mixins.coteaching import CoTeachingMixin
from lightning_noise.mixins.per_sample import PerSampleLossMixin

__all__ = ["CoTeachingMixin", "PerSampleLossMixin"]
