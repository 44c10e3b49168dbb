"""Models: ImageClassifier on any timm backbone, Co-teaching's two networks, a tiny LM."""

from lightning_noise.models.causal_lm import CausalLMModule
from lightning_noise.models.classifier import ImageClassifier, create_backbone
from lightning_noise.models.coteaching import CoTeachingClassifier
from lightning_noise.models.language_model import TinyCausalLM

__all__ = [
    "CausalLMModule",
    "CoTeachingClassifier",
    "ImageClassifier",
    "TinyCausalLM",
    "create_backbone",
]
