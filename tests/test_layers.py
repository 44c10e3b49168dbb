"""The package's import graph flows one way (docs/architecture.md): read from the source.

Every import counts, also one inside a function or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_noise"

#: Bottom to top; a part may import its own layer's parts and those below, never above.
LAYERS: list[set[str]] = [
    {
        "_validate",
        "_compat",
        "_ce_call",
        "types",
        "kernels",
        "losses",
        "functional",
        "data",
        "metrics",
    },
    {"dynamics"},
    {"callbacks", "mixins"},
    {"models", "plots", "loggers"},
    {"lightning_cli", "demo", "sweep", "recipes", "history"},
    {"cli"},
]
#: Parts that are torch-only: no Lightning import (the cores and the contracts).
TORCH_ONLY = {"_validate", "_compat", "_ce_call", "types", "kernels", "losses", "functional"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, runtime_only: bool = False) -> set[str]:
    current = _module(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    if runtime_only:  # drop `if TYPE_CHECKING:` blocks
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = current.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. ``from pkg import mod`` points at ``pkg.mod``; an
    import of a package itself points at its ``__init__`` only when nothing more precise is
    named (a package that re-exports is looked through, as Python resolves the name)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    packages = {_module(p) for p in PACKAGE.rglob("__init__.py")}
    graph = {}
    for name, path in files.items():
        named = {t for t in _imports(path) if t in files and t != name}
        precise = {t for t in named if t not in packages}
        graph[name] = precise | {
            t for t in named if t in packages and not any(p.startswith(t + ".") for p in precise)
        }
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _layer(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"lightning_noise.{part} is in no layer of tests/test_layers.py")


def _upward() -> list[str]:
    upward = []
    for source, targets in _graph().items():
        for target in targets:
            a, b = _part(source), _part(target)
            if a and b and a != b and _layer(b) > _layer(a):
                upward.append(f"{source} -> {target}")
    return upward


def test_every_import_points_down_or_sideways() -> None:
    upward = _upward()
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_callbacks_and_mixins_do_not_know_each_other() -> None:
    crossing = [
        f"{s} -> {t}"
        for s, targets in _graph().items()
        for t in targets
        if {_part(s), _part(t)} == {"callbacks", "mixins"}
    ]
    assert not crossing, "a callback never imports a mixin, nor a mixin a callback:\n" + "\n".join(
        crossing
    )


def test_no_import_circles_between_files_or_parts() -> None:
    graph = _graph()
    parts: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph.items():
        for target in targets:
            if _part(source) and _part(target) and _part(source) != _part(target):
                parts[_part(source)].add(_part(target))

    def cycle(g: dict[str, set[str]]) -> list[str] | None:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            stack.append(node)
            for nxt in sorted(g.get(node, ())):
                if state.get(nxt) == 1:
                    return [*stack[stack.index(nxt) :], nxt]
                if nxt not in state and (found := visit(nxt)):
                    return found
            stack.pop()
            state[node] = 2
            return None

        for node in sorted(g):
            if node not in state and (found := visit(node)):
                return found
        return None

    assert cycle(graph) is None, f"file circle: {' -> '.join(cycle(graph) or [])}"
    assert cycle(parts) is None, f"part circle: {' -> '.join(cycle(parts) or [])}"


def test_cores_and_contracts_import_no_lightning() -> None:
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if _part(_module(path)) in TORCH_ONLY
        and any(name.split(".")[0] == "lightning" for name in _imports(path, runtime_only=True))
    ]
    assert not offenders, f"torch-only parts import Lightning: {offenders}"


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch) -> None:
    # An import inside a function (the kind that hid the old circles) still counts.
    package = tmp_path / "lightning_noise"
    for part in ("kernels", "callbacks"):
        (package / part).mkdir(parents=True)
        (package / part / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "callbacks" / "sam.py").write_text("SAM = 1\n")
    (package / "kernels" / "fast.py").write_text(
        "def f():\n    from lightning_noise.callbacks.sam import SAM\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package, raising=False)
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert _upward() == ["lightning_noise.kernels.fast -> lightning_noise.callbacks.sam"]
