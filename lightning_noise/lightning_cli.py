"""LightningCLI for the ``lightning-noise`` command: the parser and its checks.

The command's entry point is :mod:`lightning_noise.cli`; this module is what the demo, the
sweeps and the entry point share (``build_cli``, ``SUMMARY_ENV``), so that nothing imports the
entry point back. Where recipes and configs are is :mod:`lightning_noise.recipes`.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Lightning 2.6 still calls jsonargparse APIs deprecated in jsonargparse 4.49; the warnings are
# about Lightning's code, not the user's config, so they are silenced unless asked for.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# The recipe lookup moved to lightning_noise.recipes (no torch import); kept here for callers.
from lightning_noise.recipes import find_recipe, list_recipes, recipe_summary, recipes_dir

__all__ = [
    "SUMMARY_ENV",
    "TRAINER_SUBCOMMANDS",
    "LightningNoiseCLI",
    "build_cli",
    "find_recipe",
    "list_recipes",
    "recipe_summary",
    "recipes_dir",
]

#: Environment variable naming a JSON file for the final metrics of a ``fit``.
SUMMARY_ENV = "LIGHTNING_NOISE_SUMMARY"

#: LightningCLI's subcommands (the Trainer methods it runs).
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: Warnings about the installed libraries' pairing, not the user's run, printed on every fit:
#: Lightning 2.6's pytree shim asks torch >= 2.10 a deprecated question, and torchdata's
#: StatefulDataLoader (our resumable training loader) calls torch's deprecated ``set_vital``.
#: Nothing the user can change; silenced while the CLI runs.
_NOT_THE_USERS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*'set_vital' is deprecated.*",
)


#: ``ckpt_path`` values that Lightning resolves itself (not file paths).
_CKPT_KEYWORDS = frozenset({"last", "best", "hpc", "registry"})


def check_checkpoint_file(ckpt_path: str | Path) -> None:
    """Refuse a ``--ckpt_path`` that is missing or not a checkpoint, naming the file and the fix.

    Lightning would hand the file to ``torch.load``, whose error for a damaged file advises
    loading it with ``weights_only=False`` (which runs whatever code the file holds). Every
    checkpoint Lightning writes is a zip archive (``torch.save``'s format since torch 1.6); a
    file that is not one, or is cut short (the archive's directory is at its end), is refused
    here before anything is built. A folder is accepted when it is a distributed checkpoint
    (sharded runs save one by default), which the strategy loads.
    """
    if str(ckpt_path) in _CKPT_KEYWORDS or str(ckpt_path).startswith("registry:"):
        return
    path = Path(ckpt_path)
    if path.is_dir():
        # A distributed checkpoint (FSDP2 / ModelParallelStrategy with
        # save_distributed_checkpoint=True): a folder of shards with torch.distributed
        # checkpoint's metadata file, which the strategy loads shard by shard.
        if (path / ".metadata").is_file():
            return
        raise ValueError(
            f"--ckpt_path {str(path)!r} is a folder but not a distributed checkpoint (it has no "
            "'.metadata' file): give a checkpoint file, or the folder a sharded run "
            "(ModelParallelStrategy with save_distributed_checkpoint=True) saved"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"--ckpt_path {str(path)!r} not found: give the path of a checkpoint file (a run's "
            "checkpoints/last.ckpt) or 'last' to resume from the checkpoint callback's last save"
        )
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise ValueError(
            f"--ckpt_path {str(path)!r} ({size} bytes) is not a Lightning checkpoint: it is not "
            "the zip archive torch.save writes, so it is damaged (cut short while being written "
            "or copied) or another kind of file. Resume from an earlier checkpoint of the run "
            "(its checkpoints/ folder keeps the last save and the top-k); never load a file you "
            "do not trust with weights_only=False."
        )


def _model_num_classes(data: Any) -> int:
    """The model's outputs for this DataModule: ``model_num_classes`` where it has one."""
    return int(getattr(data, "model_num_classes", data.num_classes))


class LightningNoiseCLI(LightningCLI):
    """LightningCLI with the DataModule's ``num_classes``/``in_chans`` linked to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The DataModule knows its classes and channels once built; the model must not be
        # configured twice (and wrongly) by hand.
        # ``model_num_classes``: one output more with AUM's threshold samples (their fake class).
        parser.link_arguments(
            "data", "model.init_args.num_classes", compute_fn=_model_num_classes,
            apply_on="instantiate",
        )  # fmt: skip
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI loads it for its hparams.

        Parses as LightningCLI does, without its warning that ``args`` and ``sys.argv`` are
        both set: the ``lightning-noise`` command always passes its arguments (``run``
        rewrites them), so that warning would be about our wiring, never the user's input.
        """
        if isinstance(args, dict | Namespace):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path is not None:
            check_checkpoint_file(ckpt_path)

    def before_fit(self) -> None:
        """Give W&B the whole resolved config (what ``--print_config`` shows)."""
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers or not self.trainer.is_global_zero:
            return
        import yaml

        parser = self._parser(self.subcommand)
        config = yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False))
        config.pop("config", None)  # the paths of the config files themselves
        for logger in wandb_loggers:
            logger.experiment.config.update(config, allow_val_change=True)

    def after_fit(self) -> None:
        """Write the final metrics to ``$LIGHTNING_NOISE_SUMMARY`` when set (a local sweep reads
        its objective there)."""
        path = os.environ.get(SUMMARY_ENV)
        if not path or not self.trainer.is_global_zero:
            return
        metrics = {}
        for key, value in self.trainer.callback_metrics.items():
            try:
                metrics[key] = float(value)
            except (TypeError, ValueError):
                continue
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(metrics, indent=1, sort_keys=True))


def build_cli(
    args: Sequence[str] | None = None,
    *,
    run: bool = True,
    cli_class: type[LightningNoiseCLI] = LightningNoiseCLI,
    **kwargs: Any,
) -> LightningNoiseCLI:
    """Build (and by default run) the CLI on ``args`` (``sys.argv[1:]`` when ``None``)."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    with _quiet():
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


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _NOT_THE_USERS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
