"""The README's main job, shortened: rows run, a table prints, the plot is written; rows whose
method has not acted yet say so."""

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
    for i, name in enumerate(other_rows, start=1):
        assert f"row {i}/{len(other_rows)}: {name}\n" in out
    assert f"row 1/{len(vit_rows)}: {vit_rows[0]}\n" in out
    # In 2 epochs Adaptive-k is still in its 10-epoch warm-up and Late Stopping's first round
    # (2 warm-up epochs, then FkL) has not ended; small-loss selection and Co-teaching drop
    # samples from the 2nd epoch on. The other methods act from the first step.
    noted = {r.row.name for r in results if r.note}
    assert noted == {"Adaptive-k", "Late Stopping"}
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2
    assert "Adaptive-k did not act in its 2 epochs (it kept every sample)" in notes[0]
    assert "warmup_epochs=10" in notes[0]
    assert "Late Stopping did not act in its 2 epochs (it trained on the full set" in notes[1]
    by_name = {r.row.name: r for r in results}
    assert min(by_name["Small-loss selection"].history["train/kept_fraction"]) < 1.0


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


def test_not_acting_note_reads_the_methods_own_figures() -> None:
    nan = math.nan
    # Small-loss selection for 1 epoch: its forget rate is still 0, every sample kept.
    note = demo.not_acting_note("Small-loss", {"train/kept_fraction": [1.0]}, "its hint")
    assert note is not None
    assert note.startswith("Small-loss did not act in its 1 epoch (it kept every sample)")
    assert ": its hint;" in note and "--epochs" in note
    assert demo.not_acting_note("S", {"train/kept_fraction": [1.0, 0.96]}) is None
    # Late Stopping acts when the set it trains on shrinks.
    assert demo.not_acting_note("LS", {"late_stopping/kept": [1437.0, 1437.0]}) is not None
    assert demo.not_acting_note("LS", {"late_stopping/kept": [1437.0, 1264.0]}) is None
    # Methods that log none of these act from the first step: no note.
    assert (
        demo.not_acting_note("SAM", {"train/kept_fraction": [nan, nan], "val/acc": [0.5]}) is None
    )


def test_demo_plot_shows_one_epoch_and_many_rows(tmp_path, monkeypatch) -> None:
    from lightning_noise import plots

    figures = []
    save = plots._save

    def keep(plt, fig, out):
        fig.canvas.draw()
        figures.append(fig)
        save(plt, fig, out)

    monkeypatch.setattr(plots, "_save", keep)
    keys = ("train/acc_clean_labels", "train/acc_noisy_labels", "val/acc")
    results = [
        demo.RowResult(demo.DemoRow(f"method {i}", "x.yaml"), {}, {k: [i / 12] for k in keys})
        for i in range(12)
    ]
    png = demo.plot_memorisation(results, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    mem, val = fig.axes
    lines = val.get_lines()
    assert len(lines) == 12
    assert all(line.get_marker() not in (None, "None", "") for line in mem.get_lines() + lines)
    assert len({line.get_color() for line in lines}) == 12  # the 11th is not the 1st's blue
    for ax in (mem, val):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [1.0]
    legend = val.get_legend()
    assert not legend.get_window_extent().overlaps(val.get_window_extent())


def test_demo_list_and_help_do_not_load_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lightning_noise import demo\n"
        "demo.main(['--list'])\n"
        "print(sorted(m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"
    assert demo.DEMO_ROWS[0].name in out.stdout
