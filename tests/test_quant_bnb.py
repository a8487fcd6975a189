"""Bit-exactness with bitsandbytes' CPU `quantize_4bit` / `dequantize_4bit`, in both directions."""

from __future__ import annotations

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from qlora_jax import codebooks
from qlora_jax.convert import bnb as bnb_format
from qlora_jax.quant import SUPPORTED_BLOCKSIZES, QuantizedTensor, dequantize, quantize

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.oracle

TORCH_DTYPES = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}


def _to_torch(w: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(jnp.asarray(w, dtype).astype(jnp.float32))).to(TORCH_DTYPES[dtype])


def _quant_state(qt: QuantizedTensor) -> F.QuantState:
    """Our tensor as bitsandbytes sees it, through the state dict transformers would save."""
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in bnb_format.to_state_dict(qt, "weight").items()}
    packed = tensors.pop("weight")
    return packed, F.QuantState.from_dict({k[len("weight.") :]: v for k, v in tensors.items()}, torch.device("cpu"))


def _from_bnb(packed: torch.Tensor, state: F.QuantState) -> QuantizedTensor:
    tensors = {"weight": packed.numpy()}
    tensors.update({f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()})
    return bnb_format.from_state_dict(tensors, "weight")


def _ulp_distance(a: float, b: float) -> int:
    ia, ib = np.float32(a).view(np.int32), np.float32(b).view(np.int32)
    return abs(int(ia) - int(ib))


def assert_bit_exact(w: np.ndarray, dtype, quant_type: str, blocksize: int) -> None:
    w_torch = _to_torch(w, dtype)
    ours = quantize(jnp.asarray(w, dtype), quant_type=quant_type, blocksize=blocksize)
    ours_plain = quantize(jnp.asarray(w, dtype), quant_type=quant_type, blocksize=blocksize, double_quant=False)
    packed, state = F.quantize_4bit(w_torch, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    _, plain_state = F.quantize_4bit(w_torch, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)

    # 4-bit codes and float32 absmax: byte for byte.
    np.testing.assert_array_equal(np.asarray(ours.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ours_plain.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ours_plain.absmax), plain_state.absmax.numpy())

    # Double quantization: the offset is a float32 mean. Ours is the correctly rounded one (test_quant.py); torch
    # sums in an order that depends on the CPU's vector width and thread count, and lands within an ulp or two.
    # Given the same offset, the 8-bit codes and nested absmax are byte for byte the same.
    assert _ulp_distance(float(ours.offset), state.offset.item()) <= 2
    codes, nested = F.quantize_blockwise(plain_state.absmax - torch.tensor(np.float32(ours.offset)), blocksize=256)
    np.testing.assert_array_equal(np.asarray(ours.absmax), codes.numpy())
    np.testing.assert_array_equal(np.asarray(ours.nested_absmax), nested.absmax.numpy())

    # Decoding, both ways: bitsandbytes decodes our tensor as we do, we decode bitsandbytes' as it does.
    for qt in (ours, ours_plain):
        bnb_packed, bnb_state = _quant_state(qt)
        expected = F.dequantize_4bit(bnb_packed, bnb_state).reshape(w.shape)
        got = dequantize(qt)
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected.float().numpy())
    for bnb_packed, bnb_state in ((packed, state), (packed, plain_state)):
        expected = F.dequantize_4bit(bnb_packed, bnb_state).reshape(w.shape).float().numpy()
        np.testing.assert_array_equal(np.asarray(dequantize(_from_bnb(bnb_packed, bnb_state)), np.float32), expected)


def test_code_tables_equal_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for quant_type in ("nf4", "fp4"):
        np.testing.assert_array_equal(codebooks.code_table(quant_type), F.get_4bit_type(quant_type, "cpu").numpy())
        midpoints, order = codebooks.bucket_bounds(quant_type)
        bnb_midpoints, bnb_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        np.testing.assert_array_equal(midpoints, bnb_midpoints.numpy())
        np.testing.assert_array_equal(order, bnb_order.numpy())
    np.testing.assert_array_equal(codebooks.DYNAMIC_CODE, F.create_dynamic_map().numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(256, 320), (7, 33), (4096,), (3,), (1, 1)])
def test_random_normal_is_bit_exact(quant_type, dtype, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    assert_bit_exact(w, dtype, quant_type, 64)


@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_blocksize_is_bit_exact(blocksize, quant_type):
    w = np.random.default_rng(blocksize).standard_normal((300, 70)).astype(np.float32)
    assert_bit_exact(w, jnp.bfloat16, quant_type, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_heavy_tailed_weights_are_bit_exact(quant_type):
    rng = np.random.default_rng(1)
    w = rng.standard_t(1.5, (512, 256)).astype(np.float32)  # Cauchy-like outliers in most blocks
    w[rng.uniform(size=w.shape) < 0.001] *= 1000
    assert_bit_exact(w, jnp.float32, quant_type, 64)
    assert_bit_exact(w / 1e4, jnp.bfloat16, quant_type, 64)


def test_zero_blocks_and_partial_zero_block_are_bit_exact():
    w = np.random.default_rng(2).standard_normal(64 * 5 + 10).astype(np.float32)
    w[64:128] = 0
    w[-10:] = 0
    for quant_type in ("nf4", "fp4"):
        assert_bit_exact(w, jnp.float32, quant_type, 64)


@pytest.mark.slow
def test_smollm2_real_weights_are_bit_exact(smollm2_gguf):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2_gguf)
    by_name = {t.name: t for t in reader.tensors}
    for name in ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.ffn_down.weight", "token_embd.weight"]:
        tensor = by_name[name]
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        for quant_type in ("nf4", "fp4"):
            assert_bit_exact(w, jnp.bfloat16, quant_type, 64)
        assert_bit_exact(w, jnp.float32, "nf4", 128)


@given(
    st.integers(1, 5000),
    st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    st.sampled_from(["nf4", "fp4"]),
    st.sampled_from(SUPPORTED_BLOCKSIZES),
    st.floats(-3, 3),
    st.integers(0, 2**32 - 1),
)
def test_property_bit_exact_with_bitsandbytes(n, dtype, quant_type, blocksize, log_scale, seed):
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32) * np.float32(10.0**log_scale)
    assert_bit_exact(w, dtype, quant_type, blocksize)
