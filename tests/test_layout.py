"""The package's imports only point down the data path, and nowhere loop.

Every `import` and `from ... import` in src/layershap is read with `ast`, deferred ones (inside functions)
included, so a cycle that only runs because its imports are deferred still fails here.
"""

from __future__ import annotations

import ast
import warnings
from importlib import import_module
from pathlib import Path

import pytest

import layershap

PACKAGE_DIR = Path(layershap.__file__).parent

# The stages in the order data flows through them; a module may import its own stage or an earlier one.
STAGES = ("base", "models", "data", "game", "estimate", "plan", "transform", "evaluate", "report", "api", "cli")
BASE = {"layershap", "layershap.errors", "layershap.io", "layershap.progress", "layershap.config",
        "layershap._moved"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The layershap modules a file imports: `from a.b import c` counts as a.b.c when that is a module."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return {name for name in found if name == "layershap" or name.startswith("layershap.")}


def stage_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "layershap.__main__":  # `python -m layershap`: the command line
        return "cli"
    return module.split(".")[1]


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def test_every_module_belongs_to_a_stage():
    strays = sorted(name for name in all_modules() if stage_of(name) not in STAGES)
    assert not strays, f"modules outside the stage folders: {strays}; put each in its stage (docs/architecture.md)"


def test_every_import_points_down_the_data_path():
    upward = [f"{importer} -> {imported}" for importer, targets in import_graph().items() for imported in targets
              if STAGES.index(stage_of(imported)) > STAGES.index(stage_of(importer))]
    assert not upward, "imports that point back up the stages:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_deferred_loop(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_deferred_imports_are_read(tmp_path, monkeypatch):
    source = tmp_path / "layershap" / "plan" / "thing.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from layershap.cli.options import names\n    from . import ratio\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE_DIR", tmp_path / "layershap")
    modules = {"layershap.cli.options": source, "layershap.plan.ratio": source}
    assert imported_modules(source, modules) == {"layershap.cli.options", "layershap.plan.ratio"}


@pytest.mark.parametrize("old, new", [("layershap.store", "layershap.game.store"),
                                      ("layershap.sampling", "layershap.estimate.sampling"),
                                      ("layershap.methods.shapley", "layershap.plan.methods.cooperative_game"),
                                      ("layershap.compare", "layershap.evaluate.compare")])
def test_old_module_paths_import_the_moved_module_with_a_warning(old, new):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert import_module(old) is import_module(new)
    assert any(w.category is DeprecationWarning and f"moved to {new}" in str(w.message) for w in caught)


def test_old_names_of_moved_functions_still_resolve():
    from layershap.game.context import measurement_context

    with pytest.warns(DeprecationWarning, match="layershap.game.context"):
        from layershap.estimate import measurement_context as old
    assert old is measurement_context
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from layershap.estimate import EstimateSettings
        from layershap.game import LayerGame
    assert EstimateSettings.__module__ == "layershap.estimate.pipeline"
    assert LayerGame.__module__ == "layershap.game.layer_game"
