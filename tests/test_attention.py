"""Blocked attention (queries a block at a time, each block rematerialized) equals attention over all queries, in
value and in gradient, for every mask and option the decoder uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models.attention import attend, attention_mask


def _inputs(t=13, s=13, heads=4, kv_heads=2, dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, t, heads, dim))
    k = jax.random.normal(keys[1], (2, s, kv_heads, dim))
    v = jax.random.normal(keys[2], (2, s, kv_heads, dim))
    return q, k, v


def _mask(t, *, window=None, padded=False):
    index = jnp.broadcast_to(jnp.arange(t), (2, t))
    segments = jnp.asarray(np.repeat([[0] * 6 + [1] * (t - 6)], 2, axis=0))
    valid = jnp.ones((2, t), bool).at[0, :3].set(not padded)
    return attention_mask(index, index, q_segments=segments, k_segments=segments, k_valid=valid, window=window)


@pytest.mark.parametrize("block_size", [1, 4, 5, 12])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [None, 3])
def test_blocked_equals_whole_in_value_and_gradient(block_size, softcap, window):
    q, k, v = _inputs()
    mask = _mask(q.shape[1], window=window, padded=True)  # row 0's first 3 keys are padding: some rows see nothing

    def loss(q, k, v, block):
        out = attend(q, k, v, mask, scale=0.3, softcap=softcap, block_size=block)
        return jnp.sum(jnp.sin(out)), out

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, whole), whole_grads = value_and_grads(q, k, v, None)
    (_, blocked), blocked_grads = value_and_grads(q, k, v, block_size)
    assert np.isfinite(np.asarray(blocked)).all()
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(blocked_grads, whole_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_block_at_least_the_length_is_attention_over_all_queries():
    q, k, v = _inputs()
    mask = _mask(q.shape[1])
    whole = attend(q, k, v, mask, scale=0.3)
    np.testing.assert_array_equal(attend(q, k, v, mask, scale=0.3, block_size=13), whole)
    np.testing.assert_array_equal(attend(q, k, v, mask, scale=0.3, block_size=0), whole)


def test_blocked_attention_never_holds_the_whole_score_matrix():
    """The compiled backward pass of 4 blocks needs far less temporary memory than all queries at once."""
    q, k, v = _inputs(t=512, s=512, heads=8, kv_heads=8, dim=16)
    mask = _mask(512)

    def temporaries(block):
        grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, scale=0.25, block_size=block)), (0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = 2 * 8 * 512 * 512 * 4  # batch x heads x T x S float32
    assert temporaries(None) >= scores
    assert temporaries(128) < temporaries(None) / 2
