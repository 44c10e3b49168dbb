"""Every recipe runs from the command line by name; `lightning-noise recipes` lists them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_noise.cli import find_recipe, list_recipes, main, recipe_summary

ROOT = Path(__file__).resolve().parents[1]
#: Recipes that need files a test writes first (below, and tests/test_cli.py).
NEED_FILES = {p.stem for p in (ROOT / "recipes").glob("imagefolder*.yaml")} | {
    p.stem for p in (ROOT / "recipes").glob("cifar*.yaml")
}
#: Hugging Face recipes fine-tune a local model folder the user names (tested below).
NEED_FILES |= {p.stem for p in (ROOT / "recipes").glob("hf_*.yaml")}
NEED_FILES |= {"digits_pretrained"}  # a weights file: tests/models/test_pretrained.py
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_recipes_lists_every_recipe_with_one_line(capsys) -> None:
    main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    for name in RECIPES:
        (line,) = [x for x in lines if x.split(" ", 1)[0] == name]
        summary = line[len(name) :].strip()
        assert summary and "\n" not in summary and summary.endswith((".", ")")), line
    assert set(list_recipes()) == set(RECIPES)


def test_summary_is_the_first_sentence(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# SAM (Foret et al. 2021), e.g. fast. More here.\n# Run: x\na: 1\n")
    assert recipe_summary(recipe) == "SAM (Foret et al. 2021), e.g. fast."


def test_unknown_recipe_names_close_matches() -> None:
    with pytest.raises(SystemExit, match="did you mean digits_sam"):
        find_recipe("digits_sma")
    with pytest.raises(SystemExit, match="usage"):
        main(["run"])


@pytest.mark.parametrize("name", [n for n in RECIPES if n not in NEED_FILES])
def test_recipe_runs_by_name_with_fast_dev_run(tmp_path, name) -> None:
    main(
        [
            "run",
            name,
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )


def test_trainer_presets_compose_after_a_recipe(tmp_path) -> None:
    from lightning_noise.cli import LightningNoiseCLI, build_cli

    cli = build_cli(
        [
            "--config",
            str(find_recipe("digits_sam")),
            "--config",
            str(ROOT / "configs" / "trainer" / "cpu_quick.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.trainer.max_epochs == 3 and cli.trainer.limit_train_batches == 10
    assert any(type(cb).__name__ == "SAM" for cb in cli.trainer.callbacks)  # the recipe's kept

    class ParseOnly(LightningNoiseCLI):
        def instantiate_classes(self) -> None:  # no GPU here
            pass

    gpu = build_cli(
        [
            "--config",
            str(find_recipe("digits_baseline")),
            "--config",
            str(ROOT / "configs" / "trainer" / "gpu_bf16.yaml"),
        ],
        run=False,
        cli_class=ParseOnly,
    )
    assert gpu.config["trainer"]["precision"] == "bf16-mixed"
    assert gpu.config["trainer"]["accelerator"] == "gpu"
    assert gpu.config["trainer"]["max_epochs"] == 30  # the recipe's kept


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory) -> Path:
    """Small CIFAR-10 and CIFAR-100 files in the real formats, and CIFAR-10N-style labels."""
    import numpy as np
    import torch
    from _formats import N_TRAIN_10, train_labels_10, write_cifar10, write_cifar100

    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root / "cifar-10-batches-py")
    write_cifar100(root / "cifar-100-python")
    clean = train_labels_10()
    worse = np.where(np.arange(N_TRAIN_10) % 4 == 0, (clean + 1) % 10, clean)
    torch.save({"clean_label": clean, "worse_label": worse}, root / "CIFAR-10_human.pt")
    clean100 = np.arange(200) % 100  # write_cifar100's training labels
    noisy100 = np.where(np.arange(200) % 3 == 0, (clean100 + 1) % 100, clean100)
    torch.save({"clean_label": clean100, "noisy_label": noisy100}, root / "CIFAR-100_human.pt")
    return root


#: Recipes whose one-step run adds little to a sibling's (same data and model, another loss,
#: or the same recipe on a bigger model): their runs are slow tests; the default suite builds
#: them from the CLI without training (test_slow_recipes_build_from_the_cli).
SLOW_RECIPES = {
    "cifar100_elr",
    "cifar100_label_smoothing",
    "cifar100_maxsup",
    "imagefolder_label_smoothing",
}


def _maybe_slow(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_RECIPES else n for n in names]


@pytest.mark.parametrize(
    "name", _maybe_slow(sorted(n for n in NEED_FILES if n.startswith("cifar")))
)
def test_cifar_recipes_run_on_generated_cifar_files(tmp_path, cifar_files, name) -> None:
    args = [
        "run",
        name,
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.data_dir={cifar_files}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=16",
    ]
    if name == "cifar10n_baseline":
        args.append(f"--data.init_args.noisy_labels_file={cifar_files / 'CIFAR-10_human.pt'}")
    if name == "cifar100n_baseline":
        args.append(f"--data.init_args.noisy_labels_file={cifar_files / 'CIFAR-100_human.pt'}")
    main(args)


@pytest.mark.parametrize("name", _maybe_slow(["imagefolder_label_smoothing", "imagefolder_maxsup"]))
def test_imagenet_recipes_run_on_a_small_image_folder(tmp_path, name) -> None:
    """MaxSup vs label smoothing on ImageNet: the recipes' ResNet-50 and losses, one step on
    a generated folder (imagefolder_baseline is run in tests/test_cli.py)."""
    from _formats import write_images

    write_images(tmp_path / "imgs" / "train", 4)
    write_images(tmp_path / "imgs" / "val", 2)
    main(
        [
            "run",
            name,
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.init_args.data_dir={tmp_path / 'imgs'}",
            "--data.init_args.image_size=32",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
        ]
    )


#: The papers' 32x32 networks (lightning_noise/models/backbones.py): no stem to adapt.
CIFAR_NETWORKS = ("coteaching_cnn", "preact_resnet18", "preact_resnet34")


def test_cifar_recipes_use_the_cifar_resnet() -> None:
    from lightning_noise.models import create_backbone

    for name in sorted(n for n in NEED_FILES if n.startswith("cifar")):
        text = find_recipe(name).read_text()
        backbone = yaml.safe_load(text)["model"]["init_args"]["backbone"]
        if backbone in CIFAR_NETWORKS:
            continue
        assert backbone in ("resnet18", "resnet34") and "cifar_stem: true" in text, name
    net = create_backbone("resnet18", num_classes=10, cifar_stem=True).eval()
    features = net.forward_features(torch.zeros(1, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)  # 32 / 8: no stride-2 stem, no max-pool
    plain = create_backbone("resnet18", num_classes=10).eval()
    plain = plain.forward_features(torch.zeros(1, 3, 32, 32))
    assert plain.shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="cifar_stem applies"):
        create_backbone("vit_tiny_patch16_224", num_classes=10, cifar_stem=True)


def test_data_presets_compose_after_a_recipe() -> None:
    from lightning_noise.cli import build_cli

    presets = sorted((ROOT / "configs" / "data").glob("*.yaml"))
    assert len(presets) >= 4
    for preset in presets:
        want = yaml.safe_load(preset.read_text())["data"]["init_args"]
        cli = build_cli(
            ["--config", str(find_recipe("digits_sam")), "--config", str(preset)], run=False
        )
        assert cli.datamodule.noise.kind == want["noise"]["kind"], preset.name
        assert cli.datamodule.noise.rate == pytest.approx(want["noise"]["rate"]), preset.name
        assert cli.datamodule.hparams.image_size == 16  # the recipe's other settings kept


@pytest.mark.parametrize(
    "name",
    [
        "hf_causal_lm_noisefit",
        # Slow: importing peft alone takes 10-40 s here; LoRA with NoiseFiT is also trained in
        # tests/models/test_causal_lm.py (default suite).
        pytest.param("hf_causal_lm_lora_noisefit", marks=pytest.mark.slow),
    ],
)
def test_hf_recipes_fine_tune_a_saved_tiny_llama_from_the_cli(tmp_path, name) -> None:
    """A random 4-block Llama and a word-level tokenizer saved with save_pretrained, prompt/
    response pairs in a JSONL file: `lightning-noise fit --config <recipe>` fine-tunes them."""
    pytest.importorskip("transformers")
    if "lora" in name:
        pytest.importorskip("peft")
    import _hf

    model_dir = _hf.write_model(tmp_path / "model")
    pairs = _hf.write_pairs(tmp_path / "train.jsonl")
    main(
        [
            "fit",
            "--config",
            str(find_recipe(name)),
            f"--model.init_args.pretrained={model_dir}",
            f"--data.init_args.tokenizer={model_dir}",
            f"--data.init_args.train_file={pairs}",
            f"--data.init_args.val_file={pairs}",
            "--data.init_args.batch_size=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    (ckpt,) = tmp_path.rglob("last.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    selected = checkpoint["callbacks"]["NoiseFiT"]["selected"]
    assert len(selected) == 3 and all(".layers." in layer for layer in selected)
    state = checkpoint["state_dict"]
    saved = _hf.llama().state_dict()  # the weights write_model saved
    if name == "hf_causal_lm_lora_noisefit":
        lora = [k for k in state if "lora_B" in k]
        assert lora and any(state[k].abs().sum() > 0 for k in lora)  # B starts at 0, moved
        base = "model.base_model.model.model.layers.0.mlp.down_proj.weight"  # no adapter
        assert torch.equal(state[base], saved["model.layers.0.mlp.down_proj.weight"])  # frozen
    else:
        key = "model.model.layers.0.mlp.down_proj.weight"
        assert not torch.equal(state[key], saved["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("name", sorted(SLOW_RECIPES))
def test_slow_recipes_build_from_the_cli(tmp_path, name) -> None:
    """The recipes whose runs are slow tests still parse and build (model, data, callbacks)."""
    from _formats import write_images

    from lightning_noise.cli import build_cli

    data_dir = tmp_path
    if name.startswith("imagefolder"):  # the DataModule reads its class folders when built
        data_dir = tmp_path / "imgs"
        write_images(data_dir / "train", 1)
    cli = build_cli(
        [
            "--config",
            str(find_recipe(name)),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.init_args.data_dir={data_dir}",
        ],
        run=False,
    )
    assert cli.model.criterion is not None and cli.trainer.max_epochs > 0
