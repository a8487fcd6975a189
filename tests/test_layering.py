"""The import graph of the package follows the floors of docs/architecture.md: every import points down."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qlora_jax"


def documented_floors() -> dict[str, int]:
    """{module or package: floor} from the table of docs/architecture.md."""
    floors = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        if match := re.fullmatch(r"\| (\d+) \| `(qlora_jax[\w.]*)` \|.*", line):
            floors[match[2]] = int(match[1])
    return floors


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> list[tuple[str, str]]:
    """(importer, imported) for every import of a package module, at module level or inside a function (not under
    `if TYPE_CHECKING:`), sorted."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        type_checking = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from qlora_jax.x import y`: y may be a module of its own (then x is only its package)
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = submodules if all(map(_is_module, submodules)) else [node.module, *submodules]
            else:
                continue
            for target in targets:
                if target.startswith("qlora_jax") and _is_module(target) and target != module:
                    edges.add((module, target))
    return sorted(edges)


def _room(module: str, floors: dict[str, int]) -> str | None:
    """The table's entry a module belongs to: itself, or the package it lies in."""
    parts = module.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in floors), None)


def test_every_module_has_a_floor():
    floors = documented_floors()
    assert len(floors) >= 10, "docs/architecture.md's floor table was not found"
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")} - {"qlora_jax"}
    assert [m for m in sorted(modules) if _room(m, floors) is None] == []


def test_imports_point_down():
    floors = documented_floors()
    wrong = []
    for importer, imported in import_graph():
        if importer == "qlora_jax" or imported == "qlora_jax":
            # the package's face imports lazily; only the command line reads it back (its docstring, its version)
            if importer not in ("qlora_jax", "qlora_jax.cli"):
                wrong.append(f"{importer} -> {imported} (the package's face)")
            continue
        source, target = _room(importer, floors), _room(imported, floors)
        if source != target and not floors[target] < floors[source]:
            wrong.append(f"{importer} (floor {floors[source]}) -> {imported} (floor {floors[target]})")
    assert wrong == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for importer, imported in import_graph():
        graph.setdefault(importer, set()).add(imported)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(" -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for child in sorted(graph.get(node, ())):
            # a package's __init__ importing its own modules is how it exports them, not a cycle
            if not child.startswith(node + "."):
                visit(child, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_the_graph_sees_lazy_imports(tmp_path):
    """The graph reads imports inside functions too (the CLI imports its commands' modules lazily)."""
    assert ("qlora_jax.cli", "qlora_jax.train.loop") in import_graph()


# What a run does to its directory (`train.run`) imports train's step modules (config, data, optim, step, build),
# never the other way round: within train's floor only the driver, which ties the two, reaches into it.
RUN_PACKAGE = "qlora_jax.train.run"
RUN_DRIVERS = ("qlora_jax.train.loop",)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_train_steps_never_import_the_run_package():
    wrong = [
        f"{importer} -> {imported}"
        for importer, imported in import_graph()
        if _within(imported, RUN_PACKAGE)
        and _within(importer, "qlora_jax.train")
        and not _within(importer, RUN_PACKAGE)
        and importer not in RUN_DRIVERS
    ]
    assert wrong == []


# The modules of a training *run* (the driver, its setup and export, the planner, the command line); the library's
# API (models, adapters, optimizer, step, converters) never needs the YAML schema.
RUN_MODULES = (
    "qlora_jax.train",
    "qlora_jax.train.build",
    "qlora_jax.train.loop",
    "qlora_jax.train.setup",
    "qlora_jax.train.run.export",
    "qlora_jax.train.parallel",
    "qlora_jax.train.plan",
    "qlora_jax.train.run.resume",
    "qlora_jax.train.run.run_dir",
    "qlora_jax.cli",
)


def test_only_a_run_reads_the_yaml_schema():
    readers = sorted({importer for importer, imported in import_graph() if imported == "qlora_jax.train.config"})
    assert [m for m in readers if m not in RUN_MODULES] == []
