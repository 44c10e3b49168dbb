"""LightningModule mixins: per-sample loss reduction, co-teaching and NoiseFiT's hybrid loss."""

from lightning_noise.mixins.coteaching import CoTeachingMixin
from lightning_noise.mixins.noisefit import NoiseFiTMixin
from lightning_noise.mixins.per_sample import PerSampleLossMixin

__all__ = ["CoTeachingMixin", "NoiseFiTMixin", "PerSampleLossMixin"]
