"""Models: ImageClassifier on any timm backbone."""

from lightning_noise.models.classifier import ImageClassifier, create_backbone

__all__ = ["ImageClassifier", "create_backbone"]
