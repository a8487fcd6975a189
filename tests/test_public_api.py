"""The public API is listed once (`qlora_jax._EXPORTS`); the static imports and the module docstring follow it."""

import ast
import importlib
import inspect

import qlora_jax


def _type_checking_imports() -> dict[str, str]:
    tree = ast.parse(inspect.getsource(qlora_jax))
    blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    imports = [
        (alias, node.module) for node in blocks[0].body if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    return {alias.name: module for alias, module in imports}


def test_static_imports_are_the_exports():
    assert _type_checking_imports() == qlora_jax._EXPORTS


def test_all_names_every_export_and_each_resolves_to_its_module():
    assert qlora_jax.__all__ == ["__version__", *qlora_jax._EXPORTS]
    for name, module in qlora_jax._EXPORTS.items():
        assert getattr(qlora_jax, name) is getattr(importlib.import_module(module), name), name


def test_docstring_lists_every_export():
    missing = [name for name in qlora_jax._EXPORTS if f"`{name}`" not in qlora_jax.__doc__]
    assert not missing, f"qlora_jax's docstring does not list {missing}"
