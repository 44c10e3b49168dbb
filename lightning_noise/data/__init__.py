"""Label noise (:class:`LabelNoise`), :class:`Indexed` for your own dataset, and DataModules:
embedded digits, CIFAR-10/100 (+ CIFAR-N), folders, text, prompt/response JSONL."""

from lightning_noise.data.base import NoisyLabelDataModule, stratified_split
from lightning_noise.data.cifar import (
    CIFAR100_ASYMMETRIC_MAP,
    CIFAR10DataModule,
    CIFAR100DataModule,
    load_cifar_n_labels,
)
from lightning_noise.data.digits import DIGITS_ASYMMETRIC_MAP, DigitsDataModule
from lightning_noise.data.folder import ImageFolderDataModule
from lightning_noise.data.indexed import Indexed
from lightning_noise.data.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    NOISE_TYPES,
    LabelNoise,
    NoiseKind,
    NoisyLabels,
    asymmetric_noise,
    instance_dependent_noise,
    make_noisy_labels,
    noise_transition_matrix,
    pair_noise,
    realised_noise_rate,
    symmetric_noise,
    transition_matrix_noise,
)
from lightning_noise.data.prompt_response import PromptResponseDataModule
from lightning_noise.data.text import AdditionDataModule
from lightning_noise.data.threshold import ThresholdSamples, threshold_sample_mask

__all__ = [
    "CIFAR10_ASYMMETRIC_MAP",
    "CIFAR100_ASYMMETRIC_MAP",
    "DIGITS_ASYMMETRIC_MAP",
    "NOISE_TYPES",
    "AdditionDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "Indexed",
    "LabelNoise",
    "NoiseKind",
    "NoisyLabelDataModule",
    "NoisyLabels",
    "PromptResponseDataModule",
    "ThresholdSamples",
    "asymmetric_noise",
    "instance_dependent_noise",
    "load_cifar_n_labels",
    "make_noisy_labels",
    "noise_transition_matrix",
    "pair_noise",
    "realised_noise_rate",
    "stratified_split",
    "symmetric_noise",
    "threshold_sample_mask",
    "transition_matrix_noise",
]
