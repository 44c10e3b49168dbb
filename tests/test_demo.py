"""The README's main job, shortened: rows run, a table prints, the plot is written."""

from __future__ import annotations

import math

from lightning_noise import demo


def test_demo_runs_rows_and_writes_plot(tmp_path, capsys) -> None:
    common = [
        "--epochs",
        "2",
        "--out",
        str(tmp_path),
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    # The ResNet rows run on the small test backbone; the ViT rows keep their own (small) ViT,
    # whose backbone_kwargs a ResNet would not accept.
    vit_rows = [r.name for r in demo.DEMO_ROWS if "vit" in r.recipe]
    other_rows = [r.name for r in demo.DEMO_ROWS if r.name not in vit_rows]
    assert vit_rows and other_rows
    results = demo.main(
        [
            *common,
            "--rows",
            *other_rows,
            "--model.init_args.backbone=test_resnet",
            "--data.init_args.image_size=16",
        ]
    )
    results += demo.main([*common, "--rows", *vit_rows])
    assert sorted(r.row.name for r in results) == sorted(r.name for r in demo.DEMO_ROWS)
    for result in results:
        assert len(result.history["train/acc_noisy_labels"]) == 2
        assert 0.0 <= result.metrics["test/acc"] <= 1.0
        assert not math.isnan(result.metrics["train/acc_clean_labels"])
    png = tmp_path / "memorisation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "test acc" in out and demo.DEMO_ROWS[0].name in out


def test_every_demo_recipe_exists() -> None:
    for row in demo.DEMO_ROWS:
        assert demo.find_recipe(row.recipe).is_file()
        for preset in row.callbacks:
            assert demo.find_recipe(preset, "configs/callbacks").is_file()


def test_every_callback_has_a_demo_row() -> None:
    import lightning_noise.callbacks as callbacks

    # A row brings a callback through a preset it appends or through its recipe.
    texts = " ".join(
        demo.find_recipe(p, "configs/callbacks").read_text()
        for row in demo.DEMO_ROWS
        for p in row.callbacks
    )
    texts += " ".join(demo.find_recipe(row.recipe).read_text() for row in demo.DEMO_ROWS)
    # KernelSwap changes speed and memory, not results: on the demo's CPU it would repeat the
    # baseline row. Its evidence is benchmarks/kernels.py.
    # NonFiniteGuard changes nothing on a healthy run (tests/callbacks/test_nonfinite.py is its
    # evidence); SamplePolicyCallback is the base class of user policies, not a method.
    not_in_demo = {"KernelSwap", "NonFiniteGuard", "SamplePolicyCallback"}
    for name in set(callbacks.__all__) - not_in_demo:
        assert f"class_path: lightning_noise.callbacks.{name}\n" in texts, name
