"""The ``lightning-noise`` command.

``lightning-noise fit|validate|test|predict --config recipe.yaml`` is LightningCLI over any
LightningModule and LightningDataModule chosen by ``class_path`` (the recipes use
:class:`~lightning_noise.models.ImageClassifier` with a
:class:`~lightning_noise.data.NoisyLabelDataModule`, or
:class:`~lightning_noise.models.TinyCausalLM` with
:class:`~lightning_noise.data.AdditionDataModule`); callbacks are configured by
``class_path`` in ``trainer.callbacks``. ``lightning-noise recipes`` lists the recipes with
one line each (``--copy NAME`` copies one out to edit), ``lightning-noise run <name>
[overrides]`` fits one by name, ``lightning-noise plot <run dir>`` draws a run's figures (see
:mod:`lightning_noise.plots`), ``lightning-noise sweep <name or file> --count N`` runs a W&B
sweep definition offline (see :mod:`lightning_noise.sweep`), and ``lightning-noise demo``
runs the embedded demo (see :mod:`lightning_noise.demo`).

Recipes, configs and sweep definitions ship with the package: a ``--config configs/...`` or
``recipes/...`` path that does not exist in the working directory is read from the shipped
copy (:mod:`lightning_noise.recipes`), so every command works from any folder.

Nothing heavy is imported before it is needed: ``--help``, ``recipes`` and the help of
``run`` never import torch or Lightning. A configuration or input error prints one message
(the bad value, what is allowed, the fix) and exits with a non-zero status; ``--debug`` (or
``LIGHTNING_NOISE_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_noise.recipes import (
    copy_recipe,
    find_recipe,
    list_recipes,
    print_recipes,
    recipe_summary,
    recipes_dir,
    resolve_shipped,
    shipped_root,
)

if TYPE_CHECKING:  # imported on first use (they import Lightning): see __getattr__
    from lightning_noise.lightning_cli import SUMMARY_ENV, LightningNoiseCLI, build_cli

__all__ = [
    "COMMANDS",
    "DEBUG_ENV",
    "SUMMARY_ENV",
    "LightningNoiseCLI",
    "build_cli",
    "explain_error",
    "find_recipe",
    "list_recipes",
    "main",
    "recipe_summary",
    "recipes_dir",
]

#: Set to 1 to see the traceback of a configuration or input error (as ``--debug`` does).
DEBUG_ENV = "LIGHTNING_NOISE_DEBUG"

#: LightningCLI's subcommands (the Trainer's methods).
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

#: Every subcommand with its one line for ``lightning-noise --help``.
COMMANDS = {
    "fit": "train a model: fit --config <recipe.yaml> [--key=value ...] (LightningCLI)",
    "validate": "evaluate on the validation set: validate --config <recipe> --ckpt_path <ckpt>",
    "test": "evaluate on the test set: test --config <recipe> --ckpt_path <ckpt>",
    "predict": "predict on the predict set: predict --config <recipe> --ckpt_path <ckpt>",
    "run": "fit a shipped recipe by name: run <recipe> [--key=value ...]",
    "recipes": "list the recipes, one line each; recipes --copy <name> [dest] copies one out",
    "sweep": "run a W&B sweep definition offline: sweep <name or file> --count N",
    "plot": "draw a run's figures (run folder) or the robustness table (results.csv)",
    "demo": "train the embedded noisy-digits demo and print its robustness table",
}

#: Names that ``from lightning_noise.cli import ...`` still finds, imported on first use
#: (they import Lightning).
_FROM_LIGHTNING_CLI = ("LightningNoiseCLI", "SUMMARY_ENV", "build_cli")


def __getattr__(name: str) -> Any:
    if name in _FROM_LIGHTNING_CLI:
        from lightning_noise import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-noise")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "unknown"


def help_text() -> str:
    """What ``lightning-noise --help`` prints."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lightning-noise <command> [options]",
        "",
        "Training-robustness methods for PyTorch Lightning: noisy labels, sharpness, fused",
        "kernels. Recipes (LightningCLI YAML) wire them to timm backbones and datasets.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {line}" for name, line in COMMANDS.items()),
        "",
        "Each command has its own --help (lightning-noise fit --help, lightning-noise run --help).",
        "options:",
        "  -h, --help  show this message and exit",
        "  --version   print the version and exit",
        f"  --debug     show the full traceback of an error (or set {DEBUG_ENV}=1)",
        "",
        "example: lightning-noise run digits_sam --trainer.max_epochs=5",
    ]
    return "\n".join(lines)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-noise`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        _dispatch(argv)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        message = None if debug else explain_error(err)
        if message is None:
            raise
        raise SystemExit(
            f"lightning-noise: error: {message}\n"
            f"(the full traceback: add --debug, or set {DEBUG_ENV}=1)"
        ) from None


def _dispatch(argv: list[str]) -> None:
    if not argv:
        print(help_text(), file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        print(help_text())
        return
    if command == "--version":
        print(f"lightning-noise {_version()}")
        return
    if command == "demo":
        from lightning_noise.demo import main as demo_main

        demo_main(rest)
    elif command == "plot":
        from lightning_noise.plots import main as plot_main

        plot_main(rest)
    elif command == "sweep":
        from lightning_noise.sweep import main as sweep_main

        sweep_main(_resolve_sweep(rest))
    elif command == "recipes":
        _recipes(rest)
    elif command == "run":
        _lightning(["fit", "--config", str(_run_recipe(rest)), *rest[1:]])
    elif command in TRAINER_COMMANDS or command.startswith("-"):
        _lightning(argv)  # `--config x.yaml fit` and `--print_config` go to LightningCLI too
    else:
        close = difflib.get_close_matches(command, COMMANDS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise SystemExit(
            f"lightning-noise: error: unknown command {command!r}{hint} "
            f"(commands: {', '.join(COMMANDS)}; see lightning-noise --help)"
        )


def _recipes(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-noise recipes",
        description="List the recipes (one line each), or copy one out to edit.",
        epilog=f"The shipped recipes are in {recipes_dir()}; a ./recipes folder adds to them "
        "(its files replace shipped ones of the same name).",
    )
    parser.add_argument("--copy", metavar="NAME", help="copy the recipe NAME out to edit it")
    parser.add_argument(
        "dest", nargs="?", help="with --copy: the file or folder to copy to (./NAME.yaml)"
    )
    parser.add_argument("--force", action="store_true", help="with --copy: replace DEST")
    args = parser.parse_args(argv)
    if args.copy is None:
        if args.dest is not None or args.force:
            parser.error(f"{args.dest or '--force'!r} needs --copy NAME")
        print_recipes()
        return
    target = copy_recipe(args.copy, args.dest, force=args.force)
    print(f"copied {find_recipe(args.copy)} to {target}")
    print(f"edit it, then: lightning-noise fit --config {target}")


_RUN_USAGE = "usage: lightning-noise run <recipe name or file> [--key=value overrides]"


def _run_recipe(argv: list[str]) -> Path:
    if argv and argv[0] in ("-h", "--help"):
        print(
            f"{_RUN_USAGE}\n\nFit a recipe: `run digits_sam --trainer.max_epochs=5` is `fit "
            "--config <shipped recipes>/digits_sam.yaml --trainer.max_epochs=5`. The name is "
            "looked up in ./recipes, then in the shipped recipes; a path to a YAML file works "
            "too. Overrides are those of `lightning-noise fit --help`.\n\n"
            "lightning-noise recipes          list the recipes\n"
            "lightning-noise recipes --copy <name>   copy one out to edit"
        )
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise SystemExit(f"{_RUN_USAGE}\n(lightning-noise recipes lists the names)")
    return find_recipe(argv[0])


def _resolve_sweep(argv: list[str]) -> list[str]:
    """The sweep's first argument, a relative path (``configs/sweeps/sam_rho.yaml``) missing
    from the working directory, read from the shipped tree; a name (``sam_rho``) is looked up
    by :func:`lightning_noise.sweep.find_sweep`."""
    if not argv or argv[0].startswith("-"):
        return argv
    return [str(resolve_shipped(argv[0])), *argv[1:]]


_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _resolve_value(value: str) -> str:
    """A YAML/JSON path missing from the working directory, from the shipped tree."""
    if value.endswith(_FILE_SUFFIXES) and not Path(value).exists():
        return str(resolve_shipped(value))
    return value


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every relative ``configs/...``/``recipes/...`` file that is missing from
    the working directory replaced by the shipped one (``--config configs/x.yaml``,
    ``--trainer.callbacks+=configs/callbacks/sam.yaml``); a ``--config`` file found nowhere
    is refused with its name and the places looked in."""
    out: list[str] = []
    expects_config = False
    for arg in argv:
        if expects_config:
            out.append(_config_file(arg))
            expects_config = False
        elif arg in ("-c", "--config"):
            out.append(arg)
            expects_config = True
        elif arg.startswith("--config="):
            out.append(f"--config={_config_file(arg.split('=', 1)[1])}")
        elif arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
            out.append(f"{key}={_resolve_value(value)}")
        elif arg.startswith("-"):
            out.append(arg)
        else:
            out.append(_resolve_value(arg))
    return out


def _config_file(value: str) -> str:
    resolved = _resolve_value(value)
    looks_like_a_path = value.endswith(_FILE_SUFFIXES) or "/" in value
    if looks_like_a_path and not Path(resolved).is_file():
        raise SystemExit(
            f"lightning-noise: error: config file {value!r} not found (looked in "
            f"{Path.cwd()} and in the shipped {shipped_root()}); give the path of a YAML file, "
            "or a recipe name to `lightning-noise run` (lightning-noise recipes lists them)"
        )
    return resolved


def _lightning(argv: list[str]) -> None:
    from lightning_noise.lightning_cli import TRAINER_SUBCOMMANDS, build_cli

    # Parse errors are raised (not printed with the whole usage) so that main() can report
    # them in one message.
    no_exit = {"exit_on_error": False}
    build_cli(
        resolve_config_args(argv),
        parser_kwargs={**no_exit, **{sub: dict(no_exit) for sub in TRAINER_SUBCOMMANDS}},
    )


# ---- one message for a configuration or input error ------------------------------------

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
#: Errors whose message is the whole story when our code or the config parser raised them.
_USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError, IndexError, KeyError)


def explain_error(err: BaseException) -> str | None:
    """One message for a configuration or input error, or ``None`` for anything else (a bug
    or a crash keeps its traceback).

    Counted as configuration or input errors: what the config parser refuses (an unknown
    option, a value of the wrong type or outside a ``Literal``), what a class built from the
    config refuses in its constructor (a noise rate outside [0, 1), an unknown backbone, an
    optimizer's negative learning rate, also when the model builds its optimizer later),
    what our own code raises (a missing file, a refused combination of callbacks, a run
    stopped by a guard) and Lightning's ``MisconfigurationException``.
    """
    if _is_parse_error(err):
        return explain_parse_error(str(err))
    if type(err).__name__ == "MisconfigurationException":
        return str(err)
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    text = str(root).strip() if not isinstance(root, KeyError) else repr(root)
    built = _class_built_from_config(chain)
    if built is not None and isinstance(root, _USER_ERRORS):
        where = _config_group(str(err)) or built
        return f"{where}: {text}"
    if isinstance(root, _USER_ERRORS) and _raised_by_us(root):
        return text
    return None


def _is_parse_error(err: BaseException) -> bool:
    return isinstance(err, argparse.ArgumentError) or type(err).__name__ == "ArgumentError"


def _frames(err: BaseException) -> list[Any]:
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _raised_by_us(err: BaseException) -> bool:
    frames = _frames(err)
    return bool(frames) and frames[-1].f_code.co_filename.startswith(_PACKAGE_DIR)


def _class_built_from_config(chain: list[BaseException]) -> str | None:
    """The innermost class that the config parser was building (its instantiator's
    ``class_type``) when the error was raised, or ``None`` when it was raised elsewhere.

    The parser builds the configured classes (model, data, callbacks, and on the model's
    request its optimizer and scheduler) through its instantiators; an error inside one is
    that class refusing the configured value."""
    found = None
    for exc in chain:
        for frame in _frames(exc):
            filename = frame.f_code.co_filename
            in_instantiator = "jsonargparse" in filename or filename.endswith(
                os.path.join("lightning", "pytorch", "cli.py")
            )
            class_type = frame.f_locals.get("class_type") if in_instantiator else None
            if isinstance(class_type, type):
                found = f"{class_type.__module__}.{class_type.__qualname__}"
    return found


def _config_group(message: str) -> str | None:
    """``--data (lightning_noise.data.DigitsDataModule)`` from jsonargparse's wrapper message
    (``Subtypes: [...LightningDataModule...] ... Given value: Namespace(class_path=...)``)."""
    if "Does not validate against any of the Union subtypes" not in message:
        return None
    group = None
    if "LightningDataModule" in message:
        group = "data"
    elif "LightningModule" in message:
        group = "model"
    found = re.search(r"class_path='([^']+)'", message)
    if not group or not found:
        return None
    return f"--{group} ({found.group(1)})"


_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a <class '([^']+)'>")
_UNRECOGNIZED = re.compile(r"nrecognized arguments: --([^=.\s]+)")


def explain_parse_error(message: str) -> str:
    """jsonargparse's nested error text (``Parser key "data": Does not validate against any
    of the Union subtypes ... Given value: ...``) as one message: the option, what was wrong
    with it, what is allowed and where to read more."""
    keys: list[str] = []
    classes: list[str] = []
    details: list[str] = []
    expected: list[str] = []
    given = None
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        if found := re.match(r'Parser key "([^"]+)":?\s*(.*)', line):
            keys.append(found.group(1))
            line = found.group(2).strip()
            if not line:
                continue
        if found := re.match(r"- Problem with given class_path '([^']+)':?", line):
            classes.append(found.group(1))
            continue
        if line.startswith(("Does not validate against any", "Subtypes:", "Errors:")):
            continue
        if line.startswith("Given value type:"):
            continue
        if line.startswith("Given value:"):
            given = given or line[len("Given value:") :].strip()
            continue
        line = line.lstrip("- ").strip()
        if found := _EXPECTED.fullmatch(line):
            if found.group(1) != "NoneType" or not expected:
                expected.append(found.group(1))
            continue
        if found := re.fullmatch(r"Problem with given class_path '([^']+)':?", line):
            classes.append(found.group(1))
            continue
        details.append(line)
    key = ".".join(k for k in keys if k)
    option = f"--{key}" if key else "the command line"
    texts = []
    for detail in details:
        if found := _LITERAL.search(detail):
            allowed = ", ".join(v.strip().strip("'\"") for v in found.group(1).split(","))
            texts.append(f"got {found.group(2)!r}; allowed: {allowed}")
        elif found := _NOT_ACCEPTED.search(detail):
            texts.append(_unknown_option(found.group(1), classes[-1] if classes else None, key))
        elif (found := _UNRECOGNIZED.search(detail)) and classes:
            texts.append(_unknown_option(found.group(1), classes[-1], key))
        elif "arguments are required" in detail:
            texts.append(
                f"{detail}: give a recipe, --config recipe.yaml (or lightning-noise run <name>; "
                "lightning-noise recipes lists them)"
            )
        else:
            texts.append(detail)
    if not texts and expected:
        wanted = " or ".join("null" if e == "NoneType" else e for e in expected)
        texts.append(f"got {given!r}; expected {wanted}")
    text = "; ".join(texts) if texts else message.strip()
    group = key.split(".", 1)[0] if key else ""
    if classes and group in ("data", "model"):
        fix = f"lightning-noise fit --{group}.help {classes[-1]} lists its options"
    else:
        fix = "lightning-noise fit --help lists the options"
    return f"{option}: {text} ({fix})"


def _unknown_option(option: str, class_path: str | None, key: str) -> str:
    """``DigitsDataModule has no option 'noise_rate'; did you mean noise? (its options: ...)``"""
    if class_path is None:
        return f"unknown option {option!r}"
    options = _init_options(class_path)
    close = difflib.get_close_matches(option, options, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = f" (its options: {', '.join(options)})" if options else ""
    return f"{class_path.rsplit('.', 1)[-1]} has no option {option!r}{hint}{listing}"


def _init_options(class_path: str) -> list[str]:
    """The keyword options of ``class_path``'s constructor, following ``**kwargs`` to the
    base classes as the config parser does."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    options: list[str] = []
    for klass in getattr(cls, "__mro__", (cls,)):
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        options += [
            p.name
            for p in params
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in options
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options


if __name__ == "__main__":  # pragma: no cover
    main()
