"""torchmetrics Metrics for label-noise experiments."""

from lightning_noise.metrics.noise_detection import NoiseDetection, noise_detection_scores

__all__ = ["NoiseDetection", "noise_detection_scores"]
