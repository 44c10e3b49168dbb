"""The ``lightning-noise`` command.

``lightning-noise fit|validate|test|predict --config recipe.yaml`` is LightningCLI over any
LightningModule and LightningDataModule chosen by ``class_path`` (the recipes use
:class:`~lightning_noise.models.ImageClassifier` with a
:class:`~lightning_noise.data.NoisyLabelDataModule`, or
:class:`~lightning_noise.models.TinyCausalLM` with
:class:`~lightning_noise.data.AdditionDataModule`); callbacks are configured by
``class_path`` in ``trainer.callbacks``. ``lightning-noise recipes`` lists the recipes under
``recipes/`` with one line each, ``lightning-noise run <name> [overrides]`` fits one by name,
``lightning-noise plot <run dir>`` draws a run's figures (see :mod:`lightning_noise.plots`),
``lightning-noise sweep <file> --count N`` runs a W&B sweep definition offline (see
:mod:`lightning_noise.sweep`), and ``lightning-noise demo`` runs the embedded demo (see
:mod:`lightning_noise.demo`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_noise.lightning_cli import (
    SUMMARY_ENV,
    LightningNoiseCLI,
    build_cli,
    find_recipe,
    list_recipes,
    print_recipes,
    recipe_summary,
    recipes_dir,
)

__all__ = [
    "SUMMARY_ENV",
    "LightningNoiseCLI",
    "build_cli",
    "find_recipe",
    "list_recipes",
    "main",
    "recipe_summary",
    "recipes_dir",
]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-noise`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from lightning_noise.demo import main as demo_main

        demo_main(argv[1:])
        return
    if argv and argv[0] == "plot":
        from lightning_noise.plots import main as plot_main

        plot_main(argv[1:])
        return
    if argv and argv[0] == "sweep":
        from lightning_noise.sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    if argv and argv[0] == "recipes":
        print_recipes()
        return
    if argv and argv[0] == "run":
        if len(argv) < 2 or argv[1].startswith("-"):
            raise SystemExit("usage: lightning-noise run <recipe name> [--key=value overrides]")
        argv = ["fit", "--config", str(find_recipe(argv[1])), *argv[2:]]
    build_cli(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
