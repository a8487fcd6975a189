"""Cross-entropy over the vocabulary without ever holding [tokens, vocab] float32 logits.

The hidden states are cut into chunks of `chunk_size` tokens; each chunk's logits are computed, reduced to its
loss, and dropped. The chunk function is rematerialized, so the backward pass recomputes one chunk's logits at a
time too. With a 128k vocabulary and 8k tokens, full float32 logits would take 4 GiB; a chunk of 1024, 0.5 GiB.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["IGNORE_INDEX", "auto_chunk_size", "chunked_cross_entropy", "cross_entropy_reference"]

IGNORE_INDEX = -100


def auto_chunk_size(vocab_size: int, *, budget_bytes: int = 2**28, largest: int = 1024, smallest: int = 128) -> int:
    """Tokens per loss chunk: the largest power of two up to `largest` whose float32 logits fit `budget_bytes`
    (256 MiB: 512 tokens for a 128k vocabulary, 256 for Gemma's 256k), but at least `smallest` so the lm-head
    matmul stays large enough to run efficiently."""
    tokens = largest
    while tokens > smallest and tokens * vocab_size * 4 > budget_bytes:
        tokens //= 2
    return tokens


def _chunk_loss(logits_fn, h, targets):
    logits = logits_fn(h)  # [..., V] float32
    log_z = jax.nn.logsumexp(logits, axis=-1)
    valid = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, log_z - picked, 0.0)), jnp.sum(valid)


def chunked_cross_entropy(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 1024,
    batch_shards: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of target tokens) for hidden [..., D] and targets [...] (IGNORE_INDEX: none).

    `logits_fn` maps hidden states [..., D] to float32 logits [..., V] (the model's lm head and final soft-capping).
    `batch_shards` > 1: hidden [B, T, D] has its rows split over that many devices; the chunks then cut the
    sequence axis and keep every row (each device computes `chunk_size` tokens of its own rows a chunk), where
    flattening the rows into chunks would make XLA move the hidden states between devices.
    """
    if batch_shards > 1 and hidden.ndim == 3:
        return _row_preserving(logits_fn, hidden, targets, chunk_size=chunk_size, batch_shards=batch_shards)
    d = hidden.shape[-1]
    h, t = hidden.reshape(-1, d), targets.reshape(-1)
    n = h.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t = jnp.pad(t, (0, pad), constant_values=IGNORE_INDEX)
    return _scan_chunks(logits_fn, h.reshape(-1, chunk, d), t.reshape(-1, chunk))


def _row_preserving(logits_fn, hidden, targets, *, chunk_size: int, batch_shards: int):
    b, t, d = hidden.shape
    rows_per_device = max(b // batch_shards, 1)
    span = max(1, min(t, chunk_size // rows_per_device))  # sequence positions a chunk
    pad = -t % span
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tg = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    chunks = (t + pad) // span
    h = h.reshape(b, chunks, span, d).transpose(1, 0, 2, 3)  # [chunks, B, span, D]: rows stay where they are
    return _scan_chunks(logits_fn, h, tg.reshape(b, chunks, span).transpose(1, 0, 2))


def _scan_chunks(logits_fn, h_chunks, t_chunks):
    step = jax.checkpoint(lambda hc, tc: _chunk_loss(logits_fn, hc, tc))

    def body(carry, xs):
        loss, count = step(*xs)
        return (carry[0] + loss, carry[1] + count), None

    (loss, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (h_chunks, t_chunks))
    return loss, count


def cross_entropy_reference(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The plain version: full logits [..., V]."""
    return _chunk_loss(lambda x: x, logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
