"""Rotary embeddings, attention masks (causal, packed segments, sliding windows, padding) and attention itself."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rope_tables", "apply_rope", "attention_mask", "attend"]


def rope_tables(inv_freq: np.ndarray, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] for integer positions [B, T], in float32 and then rounded to `dtype`."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, rot/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated on its first cos.shape[-1] features (HF's rotate_half layout, not interleaved)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else jnp.concatenate([out, x_pass], axis=-1)


def attention_mask(
    q_index: jax.Array,
    k_index: jax.Array,
    *,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    k_valid: jax.Array | None = None,
    window: int | jax.Array | None = None,
) -> jax.Array:
    """bool [B, T, S]: query t may attend key s.

    Args:
      q_index [B, T], k_index [B, S]: token indices in the sequence (cache slots when decoding); causal means
        k_index <= q_index.
      q_segments, k_segments: [B, T], [B, S] packed-example ids; attention stays within a segment.
      k_valid: [B, S], False for padding and empty cache slots.
      window: a sliding window of this many tokens (the query included), as transformers defines it.
    """
    q, k = q_index[:, :, None], k_index[:, None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Grouped-query attention: q [B, T, H, D], k and v [B, S, Hkv, D], mask [B, T, S] -> [B, T, H, D].

    With `block_size`, queries are taken `block_size` at a time and each block is rematerialized in the backward
    pass, so the [H, T, S] logits and probabilities never exist whole (neither in the forward nor as saved
    residuals): memory O(block_size x S) per head instead of O(T x S), for one extra forward of the attention
    scores in the backward pass. Each row's result is the same computation either way.
    """
    t = q.shape[1]
    if not block_size or t <= block_size:
        return _attend(q, k, v, mask, scale=scale, softcap=softcap)
    b, _, h, d = q.shape
    blocks = -(-t // block_size)
    pad = blocks * block_size - t  # padded query rows attend nowhere; their (finite) outputs are dropped

    def split(x):  # [B, T, ...] -> [blocks, B, block_size, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, blocks, block_size, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_block(q_and_mask):
        q_block, mask_block = q_and_mask
        return _attend(q_block, k, v, mask_block, scale=scale, softcap=softcap)

    out = jax.lax.map(one_block, (split(q), split(mask)))
    return out.swapaxes(0, 1).reshape(b, blocks * block_size, h, d)[:, :t]


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float, softcap: float | None
) -> jax.Array:
    """All queries at once. Without logit soft-capping this is `jax.nn.dot_product_attention`; Gemma 2's
    soft-capping, tanh(logits / cap) * cap before the mask, is written out (the same maths). So is float16 on CPU:
    jax.nn.dot_product_attention asks for the F16_F16_F32 dot algorithm, which XLA:CPU refuses under jit."""
    if softcap is None and not (q.dtype == jnp.float16 and jax.default_backend() == "cpu"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
