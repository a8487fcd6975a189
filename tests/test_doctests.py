"""The examples in the package's docstrings run and print what they show (as `python -m doctest` would)."""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every module of the package whose source holds an example.
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "qlora_jax").rglob("*.py")
    if ">>> " in path.read_text()
)


def test_the_documented_examples_are_found():
    for name in ("qlora_jax.models.decoder", "qlora_jax.convert.hf", "qlora_jax.nn", "qlora_jax.train.optim"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name} has '>>> ' in its source but no docstring example doctest finds"
    for test in tests:
        runner.run(test, out=out.write)
    assert runner.summarize(verbose=False).failed == 0, out.getvalue()
