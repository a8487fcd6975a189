"""The command line's flag choices are its library's: the CLI keeps copies only so that `--help` imports no JAX."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qlora_jax import cli
from qlora_jax.codebooks import QUANT_TYPES
from qlora_jax.convert.gguf_export import TENSOR_TYPES
from qlora_jax.train.config import COMPUTE_DTYPES, QUANT_CHOICES


def test_choices_are_the_owners():
    assert cli.QUANT_CHOICES == QUANT_CHOICES and set(QUANT_TYPES) < set(QUANT_CHOICES)
    assert cli.DTYPES == COMPUTE_DTYPES
    assert cli.GGUF_TYPES == TENSOR_TYPES


def test_help_imports_no_jax():
    code = "import sys; from qlora_jax.cli import build_parser; build_parser(); print('jax' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root)
    assert out.stdout.strip() == "False"
