"""The ``lightning-noise`` command.

``lightning-noise fit|validate|test|predict --config recipe.yaml`` is LightningCLI over any
LightningModule and LightningDataModule chosen by ``class_path`` (the recipes use
:class:`~lightning_noise.models.ImageClassifier` with a
:class:`~lightning_noise.data.NoisyLabelDataModule`, or
:class:`~lightning_noise.models.TinyCausalLM` with
:class:`~lightning_noise.data.AdditionDataModule`); callbacks are configured by
``class_path`` in ``trainer.callbacks``. ``lightning-noise demo`` runs the embedded demo
(see :mod:`lightning_noise.demo`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

# Lightning 2.6 still calls jsonargparse APIs deprecated in jsonargparse 4.49; the warnings are
# about Lightning's code, not the user's config, so they are silenced unless asked for.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["LightningNoiseCLI", "main"]

#: Our own subcommands, dispatched before LightningCLI parses anything.
SUBCOMMANDS = ("demo",)


class LightningNoiseCLI(LightningCLI):
    """LightningCLI with the DataModule's ``num_classes``/``in_chans`` linked to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The DataModule knows its classes and channels once built; the model must not be
        # configured twice (and wrongly) by hand.
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")


def build_cli(
    args: Sequence[str] | None = None,
    *,
    run: bool = True,
    cli_class: type[LightningNoiseCLI] = LightningNoiseCLI,
    **kwargs: Any,
) -> LightningNoiseCLI:
    """Build (and by default run) the CLI on ``args`` (``sys.argv[1:]`` when ``None``)."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return cli_class(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-noise`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from lightning_noise.demo import main as demo_main

        demo_main(argv[1:])
        return
    build_cli(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
