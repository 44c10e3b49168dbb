"""Fine-tuning a timm backbone from a local weights file (issue 15).

The tests save a random backbone's weights, as a user saves (or timm ships) pretrained ones,
and check that :class:`ImageClassifier` loads every weight but the head from that file, that
the head is a fresh one of ``num_classes`` outputs, that bad files fail clearly, and that the
recipe fine-tunes from the file through the command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_noise.cli import build_cli, main
from lightning_noise.models import ImageClassifier, create_backbone
from lightning_noise.models.classifier import load_backbone_weights

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "digits_pretrained.yaml"


def _saved(tmp_path: Path, name: str = "test_resnet", num_classes: int = 7, **kwargs):
    torch.manual_seed(123)
    source = create_backbone(name, num_classes=num_classes, **kwargs)
    # a "pretrained" network: BatchNorm statistics that are not the initial ones too
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{name}.pt"
    torch.save(source.state_dict(), path)
    return source.state_dict(), path


def _body(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("num_classes", [10, 7])
def test_every_weight_but_the_head_comes_from_the_file(tmp_path, num_classes) -> None:
    saved, path = _saved(tmp_path)
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", num_classes=num_classes, pretrained_file=str(path))
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(saved)
    for key, value in _body(saved).items():
        assert torch.equal(loaded[key], value), key
    # the head: sized num_classes, and timm's fresh initialisation (the same as a model
    # built from scratch from the same seed), never the file's, even when the sizes match
    assert model.backbone.fc.out_features == num_classes
    torch.manual_seed(0)
    scratch = ImageClassifier("test_resnet", num_classes=num_classes).backbone
    assert torch.equal(model.backbone.fc.weight, scratch.fc.weight)
    assert not torch.equal(model.backbone.fc.weight, scratch.conv1[0].weight.new_zeros(0))
    if num_classes == 7:
        assert not torch.equal(model.backbone.fc.weight, saved["fc.weight"])
    assert model.hparams.pretrained_file == str(path)


def test_other_file_formats_and_input_channels(tmp_path) -> None:
    saved, path = _saved(tmp_path)
    # safetensors (timm's own pretrained files)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, str(st))
    model = create_backbone("test_resnet", num_classes=3, pretrained_file=st)
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    # a checkpoint of an ImageClassifier: the "backbone." prefix under "state_dict"
    ckpt = tmp_path / "classifier.ckpt"
    wrapped = {f"backbone.{k}": v for k, v in saved.items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, ckpt)
    model = create_backbone("test_resnet", num_classes=3, pretrained_file=ckpt)
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    # one input channel from RGB weights: timm's adapt_input_conv (the sum over RGB)
    gray = create_backbone("test_resnet", num_classes=3, in_chans=1, pretrained_file=path)
    want = saved["conv1.0.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(gray.conv1[0].weight, want)


def test_bad_files_fail_clearly(tmp_path) -> None:
    _, path = _saved(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"pretrained_file .*does not exist"):
        ImageClassifier("test_resnet", pretrained_file=str(tmp_path / "absent.pt"))
    # another architecture: the mismatching keys and shapes are named, and the fix
    other = tmp_path / "resnet10t.pt"
    torch.save(create_backbone("resnet10t", num_classes=7).state_dict(), other)
    with pytest.raises(ValueError, match=r"does not match the backbone.*backbone_kwargs"):
        ImageClassifier("test_resnet", pretrained_file=str(other))
    # a truncated state dict: the missing weights are named
    partial = tmp_path / "partial.pt"
    state = torch.load(path, weights_only=True)
    del state["layer1.0.conv1.weight"]
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"1 weights missing .*layer1\.0\.conv1\.weight"):
        create_backbone("test_resnet", num_classes=7, pretrained_file=partial)
    # a pickled object is not read (weights_only=True), nor is a file of no tensors
    pickled = tmp_path / "object.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        create_backbone("test_resnet", num_classes=7, pretrained_file=pickled)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state dict of tensors"):
        load_backbone_weights(create_backbone("test_resnet", num_classes=7), tmp_path / "list.pt")
    # timm's download switches are refused with the local alternative
    for kwargs in ({"pretrained": True}, {"pretrained_cfg_overlay": {"file": str(path)}}):
        with pytest.raises(ValueError, match="pretrained_file"):
            ImageClassifier("test_resnet", backbone_kwargs=kwargs)


def test_recipe_fine_tunes_from_the_file_on_the_command_line(tmp_path) -> None:
    saved, path = _saved(tmp_path)
    args = [
        "--config",
        str(RECIPE),
        f"--model.init_args.pretrained_file={path}",
        "--model.init_args.backbone=test_resnet",
        "--data.init_args.image_size=16",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    cli = build_cli(args, run=False)
    built = cli.model.backbone.state_dict()
    assert all(torch.equal(built[k], v) for k, v in _body(saved).items())
    assert cli.model.backbone.fc.out_features == cli.datamodule.num_classes == 10
    main(["fit", *args])
    (last,) = tmp_path.rglob("last.ckpt")
    trained = torch.load(last, weights_only=True)["state_dict"]
    assert trained["backbone.fc.weight"].shape[0] == 10
    moved = [k for k, v in _body(saved).items() if not torch.equal(trained[f"backbone.{k}"], v)]
    assert "conv1.0.weight" in moved  # fine-tuned from the file's weights
    # without the file, the recipe stops at once and says what to set (jsonargparse wraps the
    # FileNotFoundError in a ValueError that quotes it)
    with pytest.raises(ValueError, match=r"pretrained_file 'path/to/.*' does not exist"):
        build_cli(args[:2] + args[3:], run=False)
