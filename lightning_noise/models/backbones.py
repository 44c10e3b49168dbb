"""The noisy-label papers' own networks, registered with timm so recipes can name them.

Importing :mod:`lightning_noise.models` registers these names with ``timm.register_model``;
``timm.create_model(name, num_classes=..., in_chans=...)``, ``ImageClassifier(backbone=name)``
and a recipe's ``backbone: name`` then build them (randomly initialised: there are no
pretrained weights).

* ``coteaching_cnn``: the 9-layer CNN of Co-teaching (Han et al., NeurIPS 2018, Table 3; the
  official code's ``model.py`` ``CNN``), 4,434,570 parameters for 10 classes.
* ``preact_resnet18``, ``preact_resnet34``: the CIFAR pre-activation ResNets (He et al., "Identity
  Mappings in Deep Residual Networks", ECCV 2016) in the form the noisy-label literature
  trains (DivideMix's and ELR+'s ``PreResNet.py``): a 3x3 stride-1 stem, no max-pool, blocks
  of BN-ReLU-conv, 1x1 convolutions (no BN) on the projection shortcuts and no BN-ReLU after
  the last block; 11,171,146 and 21,279,306 parameters for 10 classes.

The standard (post-activation) CIFAR ResNets that the ELR and Late Stopping code train are
timm's ``resnet18`` / ``resnet34`` with ``backbone_kwargs: {cifar_stem: true}`` (see
:func:`~lightning_noise.models.create_backbone`); they have the official models' parameter
counts (11,173,962 and 21,282,122 for 10 classes).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

__all__ = ["CoTeachingCNN", "PreActBlock", "PreActResNet"]


def _refuse_pretrained(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop timm's factory arguments that these models do not use; refuse pretrained weights."""
    if pretrained:
        raise ValueError(
            f"{name} has no pretrained weights (it is a paper's architecture trained from "
            "scratch); use pretrained=False"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return kwargs


class _Classifier(nn.Module):
    """timm's classifier interface (``forward_features`` / ``forward_head``) for our models."""

    num_features: int
    num_classes: int
    fc: nn.Module

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


# --------------------------------------------------------------------------------------------
# Co-teaching's 9-layer CNN
# --------------------------------------------------------------------------------------------
class CoTeachingCNN(_Classifier):
    """The 9-layer CNN of Co-teaching (Han et al. 2018, Table 3) for 32x32 images.

    Three blocks of 3x3 convolutions, each followed by batch norm and LeakyReLU (slope 0.01):
    128-128-128 (padding 1), 2x2 max-pool, dropout; 256-256-256 (padding 1), max-pool,
    dropout; 512-256-128 without padding (8 -> 6 -> 4 -> 2); global average pooling and a
    linear layer. The convolutions have biases, as in the official ``model.py``.

    One difference from the official code: its dropout is ``F.dropout2d(h, p)``, whose
    ``training`` argument defaults to ``True``, so the official networks drop channels also
    when evaluated; here dropout (``nn.Dropout2d``) is off in ``eval()`` mode.

    Args:
        num_classes: outputs of the last layer.
        in_chans: input channels (3 for CIFAR, 1 for MNIST).
        drop_rate: channel dropout after each pooling (official 0.25).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.25) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        widths = [(in_chans, 128, 1), (128, 128, 1), (128, 128, 1)]
        widths += [(128, 256, 1), (256, 256, 1), (256, 256, 1)]
        widths += [(256, 512, 0), (512, 256, 0), (256, 128, 0)]
        layers: list[nn.Module] = []
        for i, (cin, cout, padding) in enumerate(widths):
            layers += [
                nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=padding),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.01),
            ]
            if i in (2, 5):
                layers += [nn.MaxPool2d(2, 2), nn.Dropout2d(drop_rate)]
        self.features = nn.Sequential(*layers)
        self.num_features = 128
        self.num_classes = num_classes
        self.fc = nn.Linear(128, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)


@register_model
def coteaching_cnn(pretrained: bool = False, **kwargs: Any) -> CoTeachingCNN:
    """Co-teaching's 9-layer CNN (Han et al. 2018, Table 3)."""
    return CoTeachingCNN(**_refuse_pretrained("coteaching_cnn", pretrained, kwargs))


# --------------------------------------------------------------------------------------------
# Pre-activation ResNets for CIFAR
# --------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the identity or a 1x1 projection of the
    pre-activated input (He et al. 2016, "Identity Mappings", Fig. 4e)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input; the identity the raw one.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(_Classifier):
    """A pre-activation ResNet for 32x32 images (He et al. 2016, "Identity Mappings").

    A 3x3 stride-1 convolution to 64 channels (no BN, no max-pool), four stages of
    :class:`PreActBlock` with 64, 128, 256 and 512 channels (stride 2 from the second stage),
    global average pooling and a linear layer. As in the code the noisy-label papers train
    (DivideMix's and ELR+'s ``PreResNet.py``), there is no BN-ReLU after the last block.

    Args:
        layers: blocks per stage: ``(2, 2, 2, 2)`` for PreAct ResNet-18, ``(3, 4, 6, 3)`` for 34.
        num_classes: outputs of the last layer.
        in_chans: input channels.
    """

    def __init__(
        self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        in_planes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(PreActBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = 512
        self.num_classes = num_classes
        self.fc = nn.Linear(512, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PreAct ResNet-18 for 32x32 images (He et al. 2016; DivideMix/ELR+ ``PreResNet.py``)."""
    kwargs = _refuse_pretrained("preact_resnet18", pretrained, kwargs)
    return PreActResNet((2, 2, 2, 2), **kwargs)


@register_model
def preact_resnet34(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PreAct ResNet-34 for 32x32 images (He et al. 2016)."""
    kwargs = _refuse_pretrained("preact_resnet34", pretrained, kwargs)
    return PreActResNet((3, 4, 6, 3), **kwargs)
