"""The papers' networks (lightning_noise/models/backbones.py): parameter counts from the
architecture definitions, the figures the papers' code gives, and forward passes against a
functional reference written from those definitions."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_noise.models import CoTeachingCNN, ImageClassifier, PreActResNet, create_backbone


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int = 3, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


# ------------------------------------------------------------------------- parameter counts
def expected_coteaching_cnn(num_classes: int, in_chans: int = 3) -> int:
    """Han et al. 2018, Table 3 / official model.py: 9 biased 3x3 convs, each with BN."""
    widths = [in_chans, 128, 128, 128, 256, 256, 256, 512, 256, 128]
    total = sum(conv(a, b, bias=True) + bn(b) for a, b in itertools.pairwise(widths))
    return total + 128 * num_classes + num_classes


def expected_preact(layers: tuple[int, ...], num_classes: int, in_chans: int = 3) -> int:
    """He et al. 2016 (Identity Mappings) CIFAR form: stem conv, blocks BN-conv-BN-conv, 1x1
    projection convs without BN, no final BN, linear."""
    total, cin = conv(in_chans, 64), 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for j in range(blocks):
            total += bn(cin) + conv(cin, planes) + bn(planes) + conv(planes, planes)
            if j == 0 and (stage > 0 or cin != planes):
                total += conv(cin, planes, k=1)
            cin = planes
    return total + 512 * num_classes + num_classes


def expected_resnet(layers: tuple[int, ...], num_classes: int) -> int:
    """The post-activation CIFAR ResNet of the ELR and Late Stopping code (resnetnew.py,
    ResNet_Zoo.py): stem conv+BN, blocks conv-BN-conv-BN, 1x1 conv+BN projections."""
    total, cin = conv(3, 64) + bn(64), 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for j in range(blocks):
            total += conv(cin, planes) + bn(planes) + conv(planes, planes) + bn(planes)
            if j == 0 and stage > 0:
                total += conv(cin, planes, k=1) + bn(planes)
            cin = planes
    return total + 512 * num_classes + num_classes


@pytest.mark.parametrize(
    ("name", "num_classes", "expected", "figure"),
    [
        ("coteaching_cnn", 10, expected_coteaching_cnn(10), 4_434_570),
        ("coteaching_cnn", 100, expected_coteaching_cnn(100), None),
        # 11,171,146: the figure usually quoted for the CIFAR-10 PreAct ResNet-18.
        ("preact_resnet18", 10, expected_preact((2, 2, 2, 2), 10), 11_171_146),
        ("preact_resnet34", 10, expected_preact((3, 4, 6, 3), 10), 21_279_306),
    ],
)
def test_parameter_counts_match_the_architecture(name, num_classes, expected, figure) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    assert n_params(model) == expected
    if figure is not None:
        assert expected == figure
    assert model.get_classifier().out_features == num_classes


@pytest.mark.parametrize(
    ("name", "layers", "figure"),
    [("resnet18", (2, 2, 2, 2), 11_173_962), ("resnet34", (3, 4, 6, 3), 21_282_122)],
)
def test_cifar_stem_resnets_are_the_elr_and_late_stopping_models(name, layers, figure) -> None:
    model = create_backbone(name, num_classes=10, cifar_stem=True)
    assert n_params(model) == expected_resnet(layers, 10) == figure


# ----------------------------------------------------------------------- forward references
def reference_coteaching_cnn(model: CoTeachingCNN, x: torch.Tensor) -> torch.Tensor:
    """The official forward written out (eval mode: BN running stats, no dropout)."""
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    h = x
    for i, (c, b) in enumerate(zip(convs, bns, strict=True)):
        h = F.conv2d(h, c.weight, c.bias, padding=1 if i < 6 else 0)
        h = F.batch_norm(h, b.running_mean, b.running_var, b.weight, b.bias, eps=b.eps)
        h = F.leaky_relu(h, 0.01)
        if i in (2, 5):
            h = F.max_pool2d(h, 2, 2)
    h = F.avg_pool2d(h, kernel_size=h.shape[2]).flatten(1)
    return F.linear(h, model.fc.weight, model.fc.bias)


def reference_preact(model: PreActResNet, x: torch.Tensor) -> torch.Tensor:
    def bn_eval(b: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, b.running_mean, b.running_var, b.weight, b.bias, eps=b.eps)

    h = F.conv2d(x, model.conv1.weight, padding=1)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            out = F.relu(bn_eval(block.bn1, h))
            stride = block.conv1.stride
            short = h
            if block.shortcut is not None:  # the projection sees the pre-activated input
                short = F.conv2d(out, block.shortcut.weight, stride=stride)
            out = F.conv2d(out, block.conv1.weight, stride=stride, padding=1)
            out = F.conv2d(F.relu(bn_eval(block.bn2, out)), block.conv2.weight, padding=1)
            h = out + short
    h = F.avg_pool2d(h, 4).flatten(1)  # 4x4 maps after three stride-2 stages
    return F.linear(h, model.fc.weight, model.fc.bias)


def _randomise_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@torch.no_grad()
def test_forward_passes_match_the_official_definitions() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    cnn = timm.create_model("coteaching_cnn", num_classes=10)
    _randomise_bn(cnn)
    cnn.eval()
    torch.testing.assert_close(cnn(x), reference_coteaching_cnn(cnn, x), rtol=1e-4, atol=1e-4)
    preact = timm.create_model("preact_resnet18", num_classes=10)
    _randomise_bn(preact)
    preact.eval()
    torch.testing.assert_close(preact(x), reference_preact(preact, x), rtol=1e-4, atol=1e-4)
    assert preact.forward_features(x).shape == (2, 512, 4, 4)
    assert cnn.forward_features(x).shape == (2, 128, 2, 2)  # 8 -> 6 -> 4 -> 2, no padding


def test_dropout_is_off_in_eval_and_on_in_training() -> None:
    cnn = timm.create_model("coteaching_cnn", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    cnn.eval()
    assert torch.equal(cnn(x), cnn(x))
    cnn.train()
    torch.manual_seed(1)
    a = cnn(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, cnn(x))


def test_mnist_shape_and_classifier_interface() -> None:
    # The official MNIST runs: one channel, 28x28 (28 -> 14 -> 7 -> 5 -> 3 -> 1).
    cnn = timm.create_model("coteaching_cnn", num_classes=10, in_chans=1).eval()
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert n_params(cnn) == expected_coteaching_cnn(10, in_chans=1)
    cnn.reset_classifier(5)
    assert cnn.get_classifier().out_features == 5 and cnn(torch.zeros(1, 1, 28, 28)).shape == (1, 5)
    pre = cnn.forward_head(cnn.forward_features(torch.zeros(1, 1, 28, 28)), pre_logits=True)
    assert pre.shape == (1, 128)


def test_recipes_and_the_classifier_name_them() -> None:
    assert {"coteaching_cnn", "preact_resnet18", "preact_resnet34"} <= set(timm.list_models())
    model = ImageClassifier("preact_resnet18", num_classes=100, in_chans=3)
    assert isinstance(model.backbone, PreActResNet)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("coteaching_cnn", pretrained=True)
    with pytest.raises(ValueError, match="drop_rate"):
        CoTeachingCNN(drop_rate=1.0)
    with pytest.raises(ValueError, match="layers"):
        PreActResNet((2, 2, 2))
