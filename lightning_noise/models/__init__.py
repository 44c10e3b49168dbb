"""Models: ImageClassifier on any timm backbone."""

from lightning_noise.models.classifier import ImageClassifier, create_backbone
from lightning_noise.models.coteaching import CoTeachingClassifier

__all__ = ["CoTeachingClassifier", "ImageClassifier", "create_backbone"]
