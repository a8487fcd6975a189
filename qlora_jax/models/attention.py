"""Rotary embeddings, attention masks (causal, packed segments, sliding windows, padding) and attention itself.

Attention has three implementations (`ATTENTION_IMPLS`), chosen by `resolve_attention`:
  "xla"     `attend`: the mask as a bool [B, T, S] array and `jax.nn.dot_product_attention`'s XLA path, queries a
            block at a time (each block recomputed in the backward pass); runs anywhere; what the CPU uses.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention on NVIDIA GPUs,
            for the masks it has: causal, a sliding window, grouped-query heads, 16-bit inputs. No packed segments,
            no key-validity mask (left padding, KV caches), no logit soft-capping.
  "pallas"  `qlora_jax.kernels.flash_attention`: our Pallas (Triton) flash attention, for every mask the decoder
            uses (packed segments, key validity, query offsets into a KV cache, sliding windows, soft-capping).
  "auto"    on a GPU, cuDNN where its masks suffice, else the Pallas kernel (16-bit inputs: its tiles spill
            registers with float32 ones, so float32 takes XLA), and XLA for single-token decoding; XLA elsewhere.
Neither GPU path ever holds the [heads, T, S] scores in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qlora_jax.kernels.flash_attention import NO_WINDOW, flash_attention
from qlora_jax.models.config import RopeConfig
from qlora_jax.parallel.mesh import BATCH_AXES, context_mesh, mesh_size

__all__ = [
    "ATTENTION_IMPLS",
    "AttentionMasks",
    "rope_inverse_frequencies",
    "rope_tables",
    "apply_rope",
    "attention_mask",
    "attend",
    "multi_head_attention",
    "resolve_attention",
]

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
# Below this many queries (decoding a token at a time) a flash kernel has nothing to tile: "auto" takes XLA.
_MIN_FLASH_QUERIES = 16


def rope_inverse_frequencies(rope: RopeConfig, rotary_dim: int, positions: jax.Array) -> jax.Array:
    """float32 [rotary_dim / 2] inverse frequencies for one call over integer positions [B, T].

    Length-dependent types follow transformers' `dynamic_rope_update`, which decides per forward call from the
    call's longest sequence, L = max(position_ids) + 1: longrope takes its long factors when L >
    original_max_position_embeddings; dynamic (NTK) raises the base to theta (factor L / M - factor + 1)^(d / (d -
    2)) when L > M = max_position_embeddings, in float32 as transformers computes it. (transformers' module also
    keeps the largest L it has seen across calls; each call here starts afresh, as a newly loaded model does.)
    """
    short = jnp.asarray(rope.inverse_frequencies(rotary_dim))
    if not rope.length_dependent:
        return short
    length = jnp.max(positions).astype(jnp.int32) + 1
    if rope.rope_type == "longrope":
        scaled = jnp.asarray(rope.inverse_frequencies(rotary_dim, long=True))
    else:
        m = rope.max_position_embeddings
        stretch = jnp.float32(rope.factor) * jnp.maximum(length, m).astype(jnp.float32) / jnp.float32(m)
        base = jnp.float32(rope.theta) * (stretch - jnp.float32(rope.factor - 1)) ** jnp.float32(
            rotary_dim / (rotary_dim - 2)
        )
        exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / jnp.float32(rotary_dim)
        scaled = jnp.float32(1.0) / base**exponents
    return jnp.where(length > rope.scaled_from, scaled, short)


def rope_tables(rope: RopeConfig, rotary_dim: int, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] for integer positions [B, T]: computed in float32, multiplied by the rope's
    attention scaling (yarn, longrope), then rounded to `dtype` (transformers' `RotaryEmbedding.forward`)."""
    inv_freq = rope_inverse_frequencies(rope, rotary_dim, positions)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, rot/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if (scaling := rope.attention_scaling) != 1.0:
        cos, sin = cos * jnp.float32(scaling), sin * jnp.float32(scaling)
    return cos.astype(dtype), sin.astype(dtype)


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
    jax.nn.dot_product_attention asks for the F16_F16_F32 dot algorithm, which XLA:CPU refuses under jit. So is
    one query a sequence (decoding a token): each key and value is broadcast over its query heads, so that every
    score and output is a vector product (batched over sequences and heads) that XLA:GPU computes as a reduction
    reading the KV cache where it lies; a matrix product over the grouped heads would copy the layer's cache first.
    """
    one_query = q.shape[1] == 1
    if softcap is None and not one_query and not (q.dtype == jnp.float16 and jax.default_backend() == "cpu"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], groups, d)
    if one_query:  # k, v [B, S, Hkv, D] -> [B, S, Hkv, G, D], fused into the reductions (never materialized)
        kg, vg = (jnp.broadcast_to(a[:, :, :, None, :], (*a.shape[:3], groups, d)) for a in (k, v))
        logits = jnp.einsum("btkgd,bskgd->bkgts", qg, kg, preferred_element_type=jnp.float32) * scale
    else:
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if one_query:
        out = jnp.einsum("bkgts,bskgd->btkgd", probs, vg, preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _cudnn_unsupported(*, dtype: Any, head_dim: int, softcap: float | None, packed: bool, key_mask: bool) -> str | None:
    """Why cuDNN's fused attention (through jax.nn) cannot compute this attention exactly, or None if it can."""
    if softcap is not None:
        return "logit soft-capping (Gemma 2)"
    if packed:
        return "packed segments (segment_ids)"
    if key_mask:
        return "a key-validity mask (left padding, or a KV cache)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"{jnp.dtype(dtype)} inputs (cuDNN takes bfloat16 or float16)"
    if head_dim % 8 or head_dim > 128:
        return f"head_dim={head_dim} (cuDNN takes multiples of 8 up to 128; 256 on Hopper)"
    return None


def resolve_attention(
    impl: str,
    *,
    queries: int,
    dtype: Any,
    head_dim: int,
    softcap: float | None,
    packed: bool,
    key_mask: bool,
    backend: str | None = None,
) -> str:
    """The implementation ("xla" | "cudnn" | "pallas") that computes this attention (see the module docstring).

    Args:
      impl: one of ATTENTION_IMPLS; queries: T; dtype: of q, k, v; packed: segment ids are given; key_mask: a
        key-validity mask is given (or a KV cache is read); backend: jax's platform (default: the default backend).
    Raises ValueError for an unknown impl, or "cudnn" asked for a mask or dtype cuDNN does not have.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    why_not = _cudnn_unsupported(dtype=dtype, head_dim=head_dim, softcap=softcap, packed=packed, key_mask=key_mask)
    if impl == "cudnn" and why_not is not None:
        raise ValueError(f"attention='cudnn' cannot compute {why_not}; use 'pallas' or 'xla'")
    if impl != "auto":
        return impl
    if (backend or jax.default_backend()) != "gpu" or queries < _MIN_FLASH_QUERIES:
        return "xla"
    if why_not is None:
        return "cudnn"
    # The Pallas kernel's tiles are sized for 16-bit inputs: with float32 ones they spill registers on sm_90
    # (tens of KB a thread: `python -m qlora_jax.kernels.resources --dtype float32 --op attention`).
    return "xla" if jnp.dtype(dtype) == jnp.float32 else "pallas"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMasks:
    """What one layer's attention may see, in the form each implementation takes.

    dense: bool [B, T, S] (the "xla" path only; None otherwise); q_segments [B, T] / k_segments [B, S]: packed
    example ids or None; k_valid: bool [B, S] or None; q_offset: int32 [], the sequence index of query 0 (keys
    sit at 0 .. S-1); is_sliding: bool [] for a model whose layers mix sliding and global attention (this layer's
    flag), else None (then every layer slides iff the model has a window).
    """

    dense: jax.Array | None
    q_segments: jax.Array | None
    k_segments: jax.Array | None
    k_valid: jax.Array | None
    q_offset: jax.Array
    is_sliding: jax.Array | None


def _per_device_rows(fn, rows: tuple, shared: tuple) -> jax.Array:
    """fn(*rows, *shared), each device running it on its own batch rows under a mesh
    (`qlora_jax.parallel.mesh.context_mesh`).

    XLA cannot partition a Pallas kernel (a custom call): left alone it would gather every device's rows and
    compute the whole batch everywhere. Outside a mesh, or when the rows do not divide, fn as is."""
    mesh = context_mesh()
    n = mesh_size(mesh)
    if mesh is None or n == 1 or rows[0].shape[0] % n:
        return fn(*rows, *shared)
    specs = (P(BATCH_AXES),) * len(rows) + (P(),) * len(shared)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(BATCH_AXES), check_vma=False)(*rows, *shared)


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    masks: AttentionMasks,
    *,
    impl: str,
    window: int | None,
    scale: float,
    softcap: float | None = None,
    block_size: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, H, D], k and v [B, S, Hkv, D] -> [B, T, H, D] by the resolved implementation `impl` ("xla",
    "cudnn" or "pallas"); `window` is the model's sliding window (applied where masks.is_sliding, or everywhere if
    that is None); `block_size` is the XLA path's query block; `interpret` runs the Pallas kernel in Pallas'
    interpreter (tests on CPU)."""
    if impl == "xla":
        return attend(q, k, v, masks.dense, scale=scale, softcap=softcap, block_size=block_size)
    if impl == "pallas":
        layer_window = window
        if window is not None and masks.is_sliding is not None:
            layer_window = jnp.where(masks.is_sliding, window, NO_WINDOW)
        layer_window = jnp.asarray(NO_WINDOW if layer_window is None else layer_window, jnp.int32)

        def kernel(q, k, v, q_segments, k_segments, k_valid, q_offset, window):
            return flash_attention(
                q,
                k,
                v,
                scale=scale,
                q_segments=q_segments,
                k_segments=k_segments,
                k_valid=k_valid,
                q_offset=q_offset,
                window=window,
                softcap=softcap,
                interpret=interpret,
            )

        rows = (q, k, v, masks.q_segments, masks.k_segments, masks.k_valid)
        return _per_device_rows(kernel, rows, (masks.q_offset, layer_window))
    if impl != "cudnn":
        raise ValueError(f"resolve the attention implementation first (resolve_attention); got {impl!r}")

    def cudnn(w: int | None) -> jax.Array:
        # transformers' window W: a query sees itself and the W - 1 keys before it.
        local = None if w is None else (w - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="cudnn"
        )

    if window is not None and masks.is_sliding is not None:
        return jax.lax.cond(masks.is_sliding, lambda: cudnn(window), lambda: cudnn(None))
    return cudnn(window)
