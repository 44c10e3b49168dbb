"""FSDP2 sharding of the ready models, in one process: which blocks, when, and the refusals.

The two-process runs (ImageClassifier from the CLI, CoTeachingClassifier with SAM and
KernelSwap, each equal to DDP) are in tests/test_fsdp.py (slow).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_noise.cli import LightningNoiseCLI, build_cli
from lightning_noise.models import CoTeachingClassifier, ImageClassifier, create_backbone
from lightning_noise.models.sharding import block_units


class FakeMesh:
    """A 2-D device mesh as ModelParallelStrategy builds it, without a process group."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.tp if name == "tensor_parallel" else 2)


def _attach(module, strategy, mesh=None):
    module._trainer = SimpleNamespace(strategy=strategy)
    module._device_mesh = mesh
    return module


def test_blocks_found_by_structure_and_refusals_before_any_sharding() -> None:
    resnet = create_backbone("test_resnet", num_classes=3)
    assert block_units(resnet) == [*resnet.layer1, *resnet.layer2, *resnet.layer3, *resnet.layer4]
    vit = create_backbone("test_vit", num_classes=3, img_size=16, patch_size=8)
    assert block_units(vit) == list(vit.blocks)
    cnn = create_backbone("coteaching_cnn", num_classes=3)  # no block container: top level
    assert block_units(cnn) == [cnn.features, cnn.fc]

    # Under other strategies configure_model leaves the model alone.
    model = _attach(ImageClassifier("test_resnet", num_classes=3), DDPStrategy())
    model.configure_model()
    assert type(model.backbone).__name__ == "ResNet"
    # Tensor parallelism is refused with the fix, for both models.
    for module in (
        ImageClassifier("test_resnet", num_classes=3),
        CoTeachingClassifier("test_resnet", num_classes=3, forget_rate=0.2),
    ):
        _attach(module, ModelParallelStrategy(2, 2), FakeMesh(tp=2))
        with pytest.raises(RuntimeError, match=r"tensor_parallel_size=2; use .*"
                           r"tensor_parallel_size=1"):  # fmt: skip
            module.configure_model()
    # A parameter outside the networks would go unsynchronised: refused, by name.
    model = ImageClassifier("test_resnet", num_classes=3)
    model.temperature = nn.Parameter(model.backbone.fc.bias.new_ones(()))
    _attach(model, ModelParallelStrategy(2, 1), FakeMesh(tp=1))
    with pytest.raises(RuntimeError, match=r"\['temperature'\] lie outside them"):
        model.configure_model()
    assert type(model.backbone).__name__ == "ResNet"  # refused before anything was sharded


def test_fsdp2_trainer_config_composes_after_a_recipe(tmp_path) -> None:
    class ParseOnly(LightningNoiseCLI):
        def instantiate_classes(self) -> None:  # parsing is what is checked here
            pass

    root = Path(__file__).resolve().parents[2]
    cli = build_cli(
        ["--config", str(root / "recipes" / "digits_sam.yaml"),
         "--config", str(root / "configs" / "trainer" / "fsdp2_cpu.yaml"),
         f"--trainer.default_root_dir={tmp_path}"],
        run=False, cli_class=ParseOnly,
    )  # fmt: skip
    trainer = cli.config["trainer"]
    assert (trainer["accelerator"], trainer["devices"]) == ("cpu", 2)
    assert trainer["strategy"]["class_path"].endswith("ModelParallelStrategy")
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == 2
    assert trainer["max_epochs"] == 30  # the recipe's kept
