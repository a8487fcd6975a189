"""Grouped matmuls (a mixture of experts' rows sorted by expert) against the plain version, and their memory: one
expert's dequantized weight at a time, in the forward and in the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels.grouped import grouped_frozen_matmul, grouped_matmul, grouped_matmul_reference
from qlora_jax.quant import quantize

GROUP_SIZES = [3, 0, 9, 5, 4]  # an empty group; 21 of 23 rows grouped: the last two rows belong to none


def _data(dtype=jnp.float32, n=12, k=16, rows=23, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(GROUP_SIZES), n, k)), jnp.float32)
    return x, w, jnp.asarray(GROUP_SIZES, jnp.int32)


def _stacked_nf4(w, parts=2):
    g, n, k = w.shape
    pieces = w.reshape(g, parts, n // parts, k)
    return jax.vmap(jax.vmap(quantize))(pieces)  # each [n / parts, k] piece quantized as one bitsandbytes tensor


@pytest.mark.parametrize("tile", [1, 4, 128])
def test_dense_forward_and_gradients_match_the_reference(tile):
    x, w, sizes = _data()
    np.testing.assert_allclose(
        grouped_matmul(x, w, sizes, tile=tile), grouped_matmul_reference(x, w, sizes), rtol=1e-5, atol=1e-5
    )

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    ours = jax.grad(loss(lambda x, w: grouped_matmul(x, w, sizes, tile=tile)), (0, 1))(x, w)
    theirs = jax.grad(loss(lambda x, w: grouped_matmul_reference(x, w, sizes)), (0, 1))(x, w)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_rows_past_the_groups_are_zero_and_get_zero_gradient():
    x, w, sizes = _data()
    y = grouped_matmul(x, w, sizes, tile=4)
    assert not np.any(np.asarray(y[21:]))
    dx = jax.grad(lambda x: jnp.sum(grouped_matmul(x, w, sizes, tile=4)))(x)
    assert not np.any(np.asarray(dx[21:]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nf4_forward_and_input_gradient_match_the_reference(dtype):
    x, w, sizes = _data(dtype)
    qt = _stacked_nf4(w)
    ours = grouped_frozen_matmul(x, qt, sizes, tile=4)
    theirs = grouped_matmul_reference(x, qt, sizes)
    assert ours.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), rtol=tol, atol=tol)
    g_ours = jax.grad(lambda x: jnp.sum(grouped_frozen_matmul(x, qt, sizes, tile=4).astype(jnp.float32) ** 2))(x)
    g_theirs = jax.grad(lambda x: jnp.sum(grouped_matmul_reference(x, qt, sizes).astype(jnp.float32) ** 2))(x)
    np.testing.assert_allclose(
        np.asarray(g_ours, np.float32), np.asarray(g_theirs, np.float32), rtol=tol * 10, atol=tol * 10
    )


def test_frozen_dense_weights_get_no_gradient():
    x, w, sizes = _data()
    dw = jax.grad(lambda w: jnp.sum(grouped_frozen_matmul(x, w, sizes, tile=4)))(w)
    assert not np.any(np.asarray(dw))


def test_bad_shapes_are_refused():
    x, w, sizes = _data()
    with pytest.raises(ValueError, match="features"):
        grouped_matmul(x[:, :5], w, sizes)
    with pytest.raises(ValueError, match="one per group"):
        grouped_matmul(x, w, sizes[:3])
    with pytest.raises(ValueError, match="tile"):
        grouped_matmul(x, w, sizes, tile=0)


def test_one_expert_weight_at_a_time_in_forward_and_backward():
    """XLA's memory analysis of forward + backward over 64 experts: the temporaries stay far below the stack of
    every expert's dequantized weight (what ragged_dot, or dequantizing the layer, would hold)."""
    experts, n, k, rows = 64, 256, 256, 32
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(experts, n, k)), jnp.bfloat16)
    qt = _stacked_nf4(w, parts=1)
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
    sizes = jnp.asarray(np.bincount(rng.integers(0, experts, rows), minlength=experts), jnp.int32)

    def step(x, qt, sizes):
        return jax.grad(lambda x: jnp.sum(grouped_frozen_matmul(x, qt, sizes, tile=8).astype(jnp.float32)))(x)

    analysis = jax.jit(step).lower(x, qt, sizes).compile().memory_analysis()
    whole_stack = experts * n * k * 2  # bfloat16
    assert analysis.temp_size_in_bytes < whole_stack / 8, (analysis.temp_size_in_bytes, whole_stack)
