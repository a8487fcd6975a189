"""The 4-bit format on its own terms: sizes, error bounds, jit/vmap, bad input. No torch needed."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from qlora_jax import codebooks
from qlora_jax.quant import SUPPORTED_BLOCKSIZES, QuantizedTensor, decode_absmax, dequantize, quantize

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _max_half_gap(code: np.ndarray) -> float:
    values = np.sort(code.astype(np.float64))
    return float(np.max(np.diff(values)) / 2)


def _absmax_per_block(x: np.ndarray, blocksize: int) -> np.ndarray:
    flat = x.reshape(-1).astype(np.float64)
    padded = np.pad(flat, (0, -len(flat) % blocksize))
    return np.abs(padded.reshape(-1, blocksize)).max(axis=1)


def _check_error_bound(w: np.ndarray, qt: QuantizedTensor) -> None:
    """Every value decodes to within half the widest code gap of its block's absmax, plus the absmax's own error."""
    blocksize = qt.blocksize
    true_absmax = _absmax_per_block(w, blocksize)
    decoded_absmax = np.asarray(decode_absmax(qt), np.float64)
    if qt.double_quant:
        nested = np.repeat(np.asarray(qt.nested_absmax, np.float64), qt.dq_blocksize)[: qt.num_blocks]
        # the 8-bit step: half the widest gap of the dynamic map plus one step of its 65536-entry lookup table
        dq_bound = nested * (_max_half_gap(codebooks.DYNAMIC_CODE) + 2 / 65535) + 1e-6 * true_absmax
        np.testing.assert_array_less(np.abs(decoded_absmax - true_absmax), dq_bound + 1e-30)
    else:
        np.testing.assert_array_equal(decoded_absmax[true_absmax > 0], true_absmax[true_absmax > 0])
    half_gap = _max_half_gap(codebooks.code_table(qt.quant_type))
    per_block = true_absmax * half_gap * (1 + 1e-6) + np.abs(decoded_absmax - true_absmax)
    bound = np.repeat(per_block, blocksize)[: w.size]
    err = np.abs(np.asarray(dequantize(qt, jnp.float32), np.float64).reshape(-1) - w.reshape(-1).astype(np.float64))
    # a float16/bfloat16 output adds its own rounding
    out_eps = float(jnp.finfo(qt.dtype).eps) * np.abs(w.reshape(-1).astype(np.float64))
    assert np.all(err <= bound + out_eps + 1e-30), float(np.max(err - bound - out_eps))


def test_nf4_blocksize_64_double_quant_costs_4_127_bits():
    qt = quantize(jnp.zeros((4096, 4096), jnp.bfloat16) + 1)
    assert qt.nbytes == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 4
    assert round(qt.bits_per_param, 3) == 4.127
    assert quantize(jnp.ones((4096, 4096)), double_quant=False).bits_per_param == pytest.approx(4.5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 64), (3, 7), (1,), (1001,), (2, 3, 129)])
def test_buffers_and_round_trip(quant_type, double_quant, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    qt = quantize(w, quant_type=quant_type, double_quant=double_quant)
    n = math.prod(shape)
    assert qt.packed.shape == ((n + 1) // 2,) and qt.packed.dtype == jnp.uint8
    assert qt.absmax.shape == (-(-n // 64),)
    assert qt.absmax.dtype == (jnp.uint8 if double_quant else jnp.float32)
    if double_quant:
        assert qt.nested_absmax.shape == (-(-qt.num_blocks // 256),) and qt.offset.shape == ()
    else:
        assert qt.nested_absmax is None and qt.offset is None
    out = dequantize(qt)
    assert out.shape == shape and out.dtype == jnp.float32
    _check_error_bound(w, qt)


def test_codes_are_nearest_levels():
    """Without double quantization every value takes the code nearest to value / absmax."""
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    for quant_type in ("nf4", "fp4", "int4"):
        qt = quantize(w, quant_type=quant_type, double_quant=False)
        code = codebooks.code_table(quant_type).astype(np.float64)
        scaled = (w / np.abs(w).max(axis=1, keepdims=True)).reshape(-1, 1)
        best = np.min(np.abs(scaled - code[None, :]), axis=1)
        got = np.asarray(dequantize(qt)).reshape(-1) / np.repeat(np.abs(w).max(axis=1), 64)
        np.testing.assert_allclose(np.abs(scaled[:, 0] - got), best, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 64, 1000, 65537])
def test_double_quant_offset_is_the_correctly_rounded_mean(n):
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n * 64).astype(np.float32) * rng.uniform(0.01, 10)
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1).astype(np.float64)
    qt = quantize(w)
    assert float(qt.offset) == np.float32(math.fsum(absmax.tolist()) / n)


def test_int4_rounds_to_sevenths_of_the_absmax():
    w = np.array([0.7, -0.35, 0.06, -0.04], np.float32)
    out = np.asarray(dequantize(quantize(w, quant_type="int4", double_quant=False)))
    np.testing.assert_allclose(out, [0.7, -0.4, 0.1, 0.0], atol=1e-7)


def test_packing_puts_the_first_code_in_the_high_nibble():
    w = np.array([-1.0, 1.0, 0.0, 1.0], np.float32)  # NF4 codes 0, 15, 7, 15
    qt = quantize(w, double_quant=False)
    assert np.asarray(qt.packed).tolist() == [0x0F, 0x7F]


def test_odd_size_pads_with_the_code_of_zero():
    qt = quantize(np.array([1.0, -1.0, 1.0], np.float32), double_quant=False)
    assert np.asarray(qt.packed).tolist() == [0xF0, 0xF7]


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_defaults_to_the_input_dtype(dtype):
    w = jnp.asarray(np.random.default_rng(2).standard_normal((16, 64)), dtype)
    qt = quantize(w)
    assert dequantize(qt).dtype == dtype
    assert dequantize(qt, jnp.float32).dtype == jnp.float32
    assert qt.dtype == dtype


def test_all_zero_blocks_decode_to_zero_without_nan():
    w = np.zeros((4, 64), np.float32)
    w[1] = np.linspace(-1, 1, 64)
    for double_quant in (True, False):
        out = np.asarray(dequantize(quantize(w, double_quant=double_quant)))
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[[0, 2, 3]], 0)
    out = np.asarray(dequantize(quantize(np.zeros(100, np.float32))))  # includes an all-zero partial block
    np.testing.assert_array_equal(out, 0)


def test_jit_vmap_and_stacked_tensors():
    ws = jnp.asarray(np.random.default_rng(3).standard_normal((3, 32, 64)), jnp.float32)
    eager = [quantize(w) for w in ws]
    jitted = jax.jit(quantize)(ws[0])
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)
    stacked = jax.vmap(quantize)(ws)
    assert stacked.packed.shape == (3, 32 * 64 // 2) and stacked.shape == (32, 64)
    assert stacked.bits_per_param == pytest.approx(eager[0].bits_per_param)
    decoded = jax.vmap(dequantize)(stacked)
    for i in range(3):
        np.testing.assert_array_equal(decoded[i], dequantize(eager[i]))

    def body(carry, qt):
        return carry + jnp.sum(dequantize(qt)), None

    total, _ = jax.lax.scan(body, jnp.float32(0), stacked)
    np.testing.assert_allclose(total, sum(float(jnp.sum(dequantize(q))) for q in eager), rtol=1e-5)


def test_quantized_tensor_is_a_pytree_with_static_metadata():
    qt = quantize(np.ones((8, 64), np.float32))
    leaves, treedef = jax.tree.flatten(qt)
    assert len(leaves) == 4
    again = jax.tree.unflatten(treedef, leaves)
    assert again.shape == (8, 64) and again.quant_type == "nf4" and again.blocksize == 64
    assert "4.127" in repr(quantize(np.ones((4096, 64), np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_with_their_index(bad):
    w = np.ones((4, 8), np.float32)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*1 of 32.*index \(2, 5\)"):
        quantize(w)


def test_non_finite_values_are_rejected_under_jit():
    w = jnp.ones((4, 8)).at[1, 1].set(jnp.nan)
    with pytest.raises(Exception, match="NaN or Inf"):
        jax.block_until_ready(jax.jit(quantize)(w))


@pytest.mark.parametrize(
    ("w", "kwargs", "error", "match"),
    [
        (np.zeros((0, 4), np.float32), {}, ValueError, "empty array"),
        (np.ones(8, np.int32), {}, TypeError, "int32"),
        (np.ones(8, np.float64), {}, TypeError, "float64"),
        (np.ones(8, np.float32), {"blocksize": 48}, ValueError, "blocksize must be one of"),
        (np.ones(8, np.float32), {"dq_blocksize": 100}, ValueError, "dq_blocksize must be one of"),
        (np.ones(8, np.float32), {"quant_type": "af4"}, ValueError, "quant_type"),
    ],
)
def test_bad_arguments_raise_clear_errors(w, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(w, **kwargs)


@st.composite
def weights(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 70), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    # float16 tops out at 65504; subnormal magnitudes are out of scope (XLA flushes them to zero).
    log_scale = draw(st.floats(-4, 3 if dtype == jnp.float16 else 8))
    tail = draw(st.sampled_from(["normal", "student-t", "uniform", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if tail == "normal":
        x = rng.standard_normal(shape)
    elif tail == "student-t":
        x = rng.standard_t(2, shape)
    elif tail == "uniform":
        x = rng.uniform(-1, 1, shape)
    else:
        x = rng.standard_normal(shape) * (rng.uniform(size=shape) < 0.1)
    x = x / max(np.abs(x).max(), 1e-12) * 10.0**log_scale
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)), dtype


@given(
    weights(),
    st.sampled_from(["nf4", "fp4", "int4"]),
    st.sampled_from(SUPPORTED_BLOCKSIZES),
    st.booleans(),
    st.sampled_from([64, 256]),
)
def test_property_round_trip_error_is_bounded(data, quant_type, blocksize, double_quant, dq_blocksize):
    w, dtype = data
    qt = quantize(
        jnp.asarray(w, dtype),
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        dq_blocksize=dq_blocksize,
    )
    assert qt.packed.shape == ((w.size + 1) // 2,) and qt.absmax.shape == (qt.num_blocks,)
    out = dequantize(qt)
    assert out.shape == w.shape and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out)))
    _check_error_bound(w, qt)
