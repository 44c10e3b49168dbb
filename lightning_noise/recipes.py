"""Where the recipes, configs and sweep definitions are, from any working directory.

They live at the top of the repository (``recipes/``, ``configs/``, ``configs/sweeps/``) and
ship inside the wheel as ``lightning_noise/_packaged/{recipes,configs}`` (``setup.py`` maps
them in). :func:`shipped_root` is the folder that holds both: the wheel's copy when
installed, else the repository (a source checkout or ``pip install -e .``).

A path the user gives (``--config configs/trainer/cpu_quick.yaml``, a sweep file) is read
from the working directory when it exists there, else from the shipped tree
(:func:`resolve_shipped`); a recipe name is looked up in ``./recipes`` first, then in the
shipped recipes. ``lightning-noise recipes --copy NAME``
copies a shipped recipe out to edit (:func:`copy_recipe`).

Standard library only: ``lightning-noise recipes`` and ``--help`` must not import torch.
"""

from __future__ import annotations

import difflib
import re
import shutil
from pathlib import Path

__all__ = [
    "copy_recipe",
    "find_recipe",
    "list_recipes",
    "print_recipes",
    "recipe_summary",
    "recipes_dir",
    "resolve_shipped",
    "shipped_root",
]

#: The top-level folders that ship with the package.
SHIPPED_FOLDERS = ("recipes", "configs")
_PACKAGED = Path(__file__).resolve().parent / "_packaged"
_SOURCE = Path(__file__).resolve().parents[1]


def shipped_root() -> Path:
    """The folder holding the shipped ``recipes/`` and ``configs/``: the wheel's
    ``lightning_noise/_packaged`` when installed, else the repository's top folder."""
    for root in (_PACKAGED, _SOURCE):
        if all((root / folder).is_dir() for folder in SHIPPED_FOLDERS):
            return root
    raise FileNotFoundError(
        f"lightning-noise's recipes and configs are missing (looked in {_PACKAGED} and "
        f"{_SOURCE}): reinstall the package (pip install --force-reinstall lightning-noise)"
    )


def recipes_dir() -> Path:
    """The shipped recipes' folder."""
    return shipped_root() / "recipes"


def resolve_shipped(path: str | Path) -> Path:
    """``path`` itself when it exists (relative to the working directory) or is absolute,
    else the shipped file of that relative path when there is one (``configs/...``,
    ``recipes/...``), else ``path`` unchanged (the caller reports it missing)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    while parts and parts[0] == ".":
        parts = parts[1:]
    if parts and parts[0] in SHIPPED_FOLDERS:
        shipped = shipped_root().joinpath(*parts)
        if shipped.exists():
            return shipped
    return given


_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(?=\s)")


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's leading comment, on one line."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("Run:"):
            break
        words.append(text)
    summary = " ".join(words)
    end = _SENTENCE_END.search(summary)  # a full stop, not that of "et al." or "e.g."
    return summary if end is None else summary[: end.start() + 1]


def _by_name(folder: Path, local: Path) -> dict[str, Path]:
    """Name (file stem) -> path of the ``*.yaml`` in the shipped ``folder``, with those of
    ``local`` (a folder of the working directory) in their place where the names agree."""
    found = {p.stem: p for p in folder.glob("*.yaml")}
    if local.is_dir() and local.resolve() != folder.resolve():
        found.update({p.stem: p for p in local.glob("*.yaml")})
    return dict(sorted(found.items()))


def list_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> path, sorted by name: the shipped recipes, and those of
    ``./recipes`` (which take the place of a shipped one of the same name)."""
    return _by_name(recipes_dir(), Path.cwd() / "recipes")


def find_recipe(name: str) -> Path:
    """The recipe called ``name`` (``digits_sam``, ``digits_sam.yaml``) or at the path
    ``name``, or a ``SystemExit`` naming the close matches."""
    known = list_recipes()
    if name.endswith((".yaml", ".yml")) or "/" in name:  # a path, not a name
        path = resolve_shipped(name)
        if path.is_file():
            return path
    stem = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    if "/" not in name and stem in known:
        return known[stem]
    close = difflib.get_close_matches(stem, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SystemExit(f"no recipe named {name!r}{hint} (`lightning-noise recipes` lists them)")


def print_recipes() -> None:
    """``lightning-noise recipes``: one line per recipe, then where they are."""
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")
    local = sorted(n for n, p in recipes.items() if p.parent != recipes_dir())
    print(f"\nrun one: lightning-noise run <name> [--key=value overrides]  ({recipes_dir()})")
    if local:
        print(f"from ./recipes (in place of the shipped ones of that name): {', '.join(local)}")
    print("edit one: lightning-noise recipes --copy <name> [destination]")


def copy_recipe(name: str, dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Copy the recipe ``name`` to ``dest`` (a file, or a folder to copy into; default
    ``./<name>.yaml``) and return the new file. An existing file is kept unless ``force``."""
    source = find_recipe(name)
    target = Path(dest) if dest is not None else Path(f"{source.stem}.yaml")
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise SystemExit(f"{target} exists: give another destination, or add --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
