"""ImageClassifier: timm backbones, per-sample losses, metrics and the memorisation curve."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_noise.data import DigitsDataModule, LabelNoise
from lightning_noise.models import ImageClassifier, create_backbone
from lightning_noise.types import SampleBatch


def test_unknown_backbone_names_the_value_and_suggests() -> None:
    with pytest.raises(ValueError, match=r"'resnet181'.*did you mean"):
        create_backbone("resnet181", num_classes=10)


def test_pretrained_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be downloaded"):
        create_backbone("resnet18", num_classes=10, pretrained=True)


def test_backbone_kwargs_pass_through() -> None:
    model = ImageClassifier(
        "resnet18", num_classes=4, in_chans=1, backbone_kwargs={"drop_rate": 0.3}
    )
    assert model.backbone.drop_rate == 0.3
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"in_chans": 0}, {"ece_bins": 0}])
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        ImageClassifier("test_resnet", **kwargs)


def test_per_sample_loss_matches_cross_entropy() -> None:
    model = ImageClassifier("test_resnet", num_classes=5, in_chans=3)
    logits, target = torch.randn(7, 5), torch.randint(0, 5, (7,))
    expected = nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(model.per_sample_loss(logits, target), expected)


def test_criterion_without_per_sample_output_is_rejected() -> None:
    class MeanOnly(nn.Module):
        def forward(self, logits, target):
            return nn.functional.cross_entropy(logits, target)

    model = ImageClassifier("test_resnet", num_classes=5, criterion=MeanOnly())
    with pytest.raises(ValueError, match="one loss per sample"):
        model.per_sample_loss(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_criterion_reduction_is_set_to_none() -> None:
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    model = ImageClassifier("test_resnet", num_classes=5, criterion=crit)
    assert model.criterion.reduction == "none"


def test_training_step_needs_indices() -> None:
    model = ImageClassifier("test_resnet", num_classes=5, in_chans=1)
    with pytest.raises(ValueError, match=r"\(input, target, index\).*Indexed\(dataset\)"):
        model.training_step((torch.zeros(2, 1, 16, 16), torch.tensor([0, 1])), 0)


def test_memorisation_metrics_against_hand_count() -> None:
    model = ImageClassifier("test_resnet", num_classes=3, in_chans=1)
    model.noise_mask = torch.tensor([False, True, True, False, True])
    model.clean_targets = torch.tensor([0, 1, 2, 0, 1])
    logits = torch.tensor(
        [[5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0], [0, 5.0, 0], [0, 5.0, 0]]
    )  # predictions 0, 2, 2, 1, 1
    given = torch.tensor([0, 2, 0, 0, 0])  # noisy labels on samples 1, 2, 4
    batch = SampleBatch.create(torch.arange(5), given, logits, torch.zeros(5))
    model._update_memorisation(batch)
    # clean-labelled samples 0, 3: correct 1 of 2; noisy-labelled 1, 2, 4: predicted the given
    # label on sample 1 only; true class recovered on sample 2 and 4.
    assert model.train_acc_clean.compute().item() == pytest.approx(1 / 2)
    assert model.train_acc_noisy.compute().item() == pytest.approx(1 / 3)
    assert model.train_recovered.compute().item() == pytest.approx(2 / 3)
    # An index past the noise mask is refused (checked on the device, raised at once on the CPU).
    bad = SampleBatch.create(torch.tensor([0, 5]), given[:2], logits[:2], torch.zeros(2))
    with pytest.raises(ValueError, match="noise mask of 5 samples"):
        model._update_memorisation(bad)


def test_reaches_90_percent_on_clean_digits(tmp_path) -> None:
    """The issue's bar: at least 90% test accuracy on clean digits.

    test_resnet at 8 px on one channel with the recipes' SGD (the robustness benchmark's
    size): 8 epochs. Measured here: 0.933 after 6 epochs, 0.958 after 10.
    """
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, image_size=8, channels=1, seed=0)
    model = ImageClassifier(
        "test_resnet",
        num_classes=dm.num_classes,
        in_chans=dm.in_chans,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    trainer = pl.Trainer(
        max_epochs=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert result["test/acc"] >= 0.90, result
    assert 0.0 <= result["test/ece"] < 0.2


def test_memorisation_curve_is_logged_under_noise(tmp_path) -> None:
    pl.seed_everything(0)
    dm = DigitsDataModule(noise=LabelNoise(rate=0.4), batch_size=64, image_size=16, seed=0)
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=dm.in_chans)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)
    assert model.noise_mask.sum().item() == int(dm.noise_mask.sum())
    for key in ("train/acc_clean_labels", "train/acc_noisy_labels", "train/recovered_noisy"):
        assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0
