"""Models: ImageClassifier on any timm backbone, Co-teaching's two networks, a tiny LM.

Importing this package registers the papers' networks with timm (:mod:`.backbones`:
``coteaching_cnn``, ``preact_resnet18``, ``preact_resnet34``) and provides the papers' LR
schedules (:mod:`.schedules`).
"""

from lightning_noise.models.backbones import CoTeachingCNN, PreActResNet
from lightning_noise.models.causal_lm import CausalLMModule
from lightning_noise.models.classifier import ImageClassifier, create_backbone
from lightning_noise.models.coteaching import CoTeachingClassifier
from lightning_noise.models.language_model import TinyCausalLM

__all__ = [
    "CausalLMModule",
    "CoTeachingCNN",
    "CoTeachingClassifier",
    "ImageClassifier",
    "PreActResNet",
    "TinyCausalLM",
    "create_backbone",
]
