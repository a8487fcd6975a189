"""benchmarks/decode_ladder.py: each rung of the benchmark's ladder computes what it says, and lowers for CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import codebooks
from qlora_jax.kernels import DecodeConfig
from qlora_jax.kernels.decode import decode_reference
from qlora_jax.kernels.lowering import export_for_cuda
from qlora_jax.quant import dequantize, quantize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ladder():
    spec = importlib.util.spec_from_file_location("decode_ladder", ROOT / "benchmarks" / "decode_ladder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("decode_ladder", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("double_quant", [False, True])
def test_each_rung_computes_what_it_says(ladder, double_quant):
    """Row sums of the bytes, the nibbles, the code values, the dequantized weight; the last rung is the kernel."""
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32) * 0.05
    qt = quantize(jnp.asarray(w), double_quant=double_quant)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 256)), jnp.bfloat16)
    config = DecodeConfig(block_n=32, block_k=128, split_k=2, dot="fma", lookup="gather")
    rungs = [ladder.ladder(x, qt, config=config, stage=s, interpret=True) for s in range(len(ladder.LADDER))]
    packed = np.asarray(qt.packed).reshape(64, 128).astype(np.float32)
    hi, lo = np.floor(packed / 16), packed % 16
    table = np.asarray(codebooks.code_table(qt.quant_type))
    np.testing.assert_allclose(np.asarray(rungs[0])[0], packed.sum(1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rungs[1])[0], (hi + lo).sum(1), rtol=1e-6)
    codes = np.stack([hi, lo], -1).astype(np.int64)
    np.testing.assert_allclose(np.asarray(rungs[2])[0], table[codes].sum((1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rungs[3])[0], np.asarray(dequantize(qt)).sum(1), rtol=1e-5, atol=1e-5)
    want = np.asarray(decode_reference(x, qt), np.float32)
    np.testing.assert_allclose(np.asarray(rungs[4], np.float32), want, atol=2e-2 * np.abs(want).max(), rtol=0)
    with pytest.raises(ValueError, match="stage must be in"):
        ladder.ladder(x, qt, config=config, stage=5)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_every_rung_lowers(ladder, blocksize):
    """Every rung gpu.py times, both lookups, block_k below / above the blocksize."""
    qt = jax.eval_shape(lambda: quantize(jnp.zeros((256, 512), jnp.bfloat16), blocksize=blocksize))
    x = jax.ShapeDtypeStruct((1, 512), jnp.bfloat16)
    for block_k in (64, 512):
        for lookup in ("gather", "select"):
            config = DecodeConfig(block_n=128, block_k=block_k, split_k=1, dot="fma", lookup=lookup)
            for stage in range(len(ladder.LADDER)):
                exported = export_for_cuda(
                    lambda x, q, s=stage, c=config: ladder.ladder(x, q, config=c, stage=s), x, qt
                )
                assert "triton" in exported.mlir_module()
