"""Flash attention (forward and backward) as Pallas Triton kernels, for every mask the decoder uses, beside its
plain-JAX reference.

    out = flash_attention(q, k, v, scale=..., q_segments=..., k_segments=..., k_valid=..., q_offset=..., window=...)

q [B, T, H, D], k and v [B, S, Hkv, D] (grouped-query: H a multiple of Hkv; no copy of k/v per query head). Query
t (at sequence index q_offset + t) attends key s iff s <= q_offset + t (causal), q_offset + t - s < window (a
sliding window as transformers defines it), q_segments[t] == k_segments[s] (packed rows) and k_valid[s] (padding,
empty cache slots). Optional tanh soft-capping of the logits (Gemma 2). q_offset and window may be traced scalars
(a cache index, a per-layer window in a layer scan).

The [H, T, S] scores never exist in memory: each program holds one block of queries and walks the key blocks its
mask can reach (blocks past the causal diagonal or before the window are skipped, not masked), keeping the running
max and sum of the softmax (FlashAttention-2, Dao 2023). The backward pass recomputes the probabilities from the
saved log-sum-exp: one kernel for dq (per query block), one for dk and dv (per key block, summing over the query
heads of its group). A query that may attend no key at all gets output 0 (the XLA path averages the values
instead); such rows are padding, and nothing reads them.

Why our own kernel: jax's `jax.experimental.pallas.ops.gpu.attention` is deprecated upstream (in favour of
tokamax, which needs Python >= 3.12 and jax >= 0.11), and has no grouped-query heads, sliding windows, query
offsets, key padding or soft-capping; cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) has no packed
segments, key-validity masks or soft-capping. `qlora_jax.models.attention` picks cuDNN where its masks suffice and
this kernel for the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import common

__all__ = ["FlashConfig", "flash_attention", "flash_attention_reference", "NO_WINDOW"]

# A window longer than any sequence: "no sliding window", as an int32 the kernels can add to without overflow.
NO_WINDOW = 2**30
# Key segment of an invalid key (padding, empty cache slot): equal to no query's segment.
_INVALID_SEGMENT = -(2**31)
_MASKED = -1e30  # a finite "minus infinity" for masked logits: exp(_MASKED - m) is 0, never NaN


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlashConfig:
    """Tile sizes (powers of two, >= 16) of the forward and the two backward kernels, and Triton launch settings
    (`num_warps_bwd` / `num_stages_bwd`: the backward kernels', default the forward's).

    `for_head_dim` picks them per head width, from XLA:GPU's compile of each kernel for sm_90 (ptxas' registers and
    spills; `python -m qlora_jax.kernels.resources --op attention`): no spills, Hopper's warpgroup MMA (wgmma)
    where the tiles allow it. Speed is not measured (docs/kernels.md)."""

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"FlashConfig.{name} must be a power of two >= 16, got {value}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> FlashConfig:
        """The tiles for heads of `head_dim` (padded to a power of two). On an H100 (ptxas, sm_90a): up to 64, 64 x 64
        tiles and 4 warps everywhere (118-200 registers, 2-4 programs per SM, wgmma); up to 128, the forward takes
        128 x 64 tiles with 8 warps and 3 stages (159 registers, wgmma) and the backward 64 x 64 with 8 warps and
        2 stages: the dk/dv kernel's two [64, 128] float32 accumulators then fit in 248 registers a thread without
        spilling (4 warps spilled at 255); wider heads take 32-row backward tiles (no spill; warp-level MMA)."""
        if head_dim > 128:
            return cls(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32, num_warps=8)
        if head_dim > 64:
            return cls(
                block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3, num_stages_bwd=2
            )
        return cls()

    @property
    def backward_launch(self) -> tuple[int, int]:
        """(num_warps, num_stages) of the backward kernels."""
        warps = self.num_warps if self.num_warps_bwd is None else self.num_warps_bwd
        return warps, self.num_stages if self.num_stages_bwd is None else self.num_stages_bwd


def _mask(q_pos, k_pos, q_seg, k_seg, window, *, transposed=False):
    """bool [bq, bk] from query/key positions and segments (invalid keys carry _INVALID_SEGMENT); with
    `transposed`, its transpose [bk, bq], built as such."""
    if transposed:
        diff = q_pos[None, :] - k_pos[:, None]
        return (diff >= 0) & (diff < window) & (q_seg[None, :] == k_seg[:, None])
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window) & (q_seg[:, None] == k_seg[None, :])


def _logits(q, k, *, scale, softcap):
    """float32 [bq, bk] scaled (and soft-capped) logits of a query tile [bq, D] against a key tile [bk, D] (with the
    tiles swapped, the transposed logits [bk, bq])."""
    s = (
        jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=common.dot_precision(q.dtype)
        )
        * scale
    )
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def _key_block_range(q_start, q_offset, window, *, bq, bk, num_k_blocks):
    """[lo, hi) of the key blocks queries q_start .. q_start + bq - 1 may attend (causal, windowed)."""
    first = q_offset + q_start  # sequence index of the block's first query
    lo = jnp.maximum(first - window + 1, 0) // bk
    hi = jnp.minimum((first + bq - 1) // bk + 1, num_k_blocks)
    return lo, hi


def _query_block_range(k_start, q_offset, window, *, bq, bk, num_q_blocks):
    """[lo, hi) of the query blocks that may attend keys k_start .. k_start + bk - 1."""
    lo = jnp.maximum(k_start - q_offset, 0) // bq
    last = k_start + bk - 1 + window - 1 - q_offset  # the last query index that can still see the block
    hi = jnp.clip(last // bq + 1, 0, num_q_blocks)
    return lo, hi


def _forward_kernel(
    meta_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, softcap, bq, bk, num_k_blocks
):
    i = pl.program_id(0)
    q_offset, window = meta_ref[0], meta_ref[1]
    q = q_ref[...]  # [bq, D]
    q_seg = qseg_ref[...]
    q_pos = q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)
    lo, hi = _key_block_range(i * bq, q_offset, window, bq=bq, bk=bk, num_k_blocks=num_k_blocks)

    def body(j, carry):
        acc, m, total = carry
        keys = pl.ds(j * bk, bk)
        s = _logits(q, k_ref[keys, :], scale=scale, softcap=softcap)
        mask = _mask(q_pos, j * bk + jnp.arange(bk, dtype=jnp.int32), q_seg, kseg_ref[keys], window)
        s = jnp.where(mask, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        v = v_ref[keys, :]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=common.dot_precision(v.dtype))
        return acc * correction[:, None] + pv, m_new, total * correction + jnp.sum(p, axis=1)

    d = q.shape[-1]
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, total = jax.lax.fori_loop(lo, hi, body, init)  # total: the softmax denominator, relative to m
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    o_ref[...] = (acc / safe_total[:, None]).astype(o_ref.dtype)
    # A row that sees nothing gets lse = +large: the backward's probabilities exp(s - lse) are then 0, not NaN.
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), -_MASKED)


def _probs_and_dlogits(q, k, v, do, lse, delta, mask, *, scale, softcap):
    """(p [bq, bk] float32, ds [bq, bk] float32): the probabilities and the gradient of the pre-scale logits."""
    s = _logits(q, k, scale=scale, softcap=softcap)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = jax.lax.dot_general(
        do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=common.dot_precision(do.dtype)
    )
    ds = p * (dp - delta[:, None])
    if softcap is not None:
        ds = ds * (1.0 - (s / softcap) ** 2)  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
    return p, ds * scale


def _dq_kernel(
    meta_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    scale,
    softcap,
    bq,
    bk,
    num_k_blocks,
):
    i = pl.program_id(0)
    q_offset, window = meta_ref[0], meta_ref[1]
    q, do, lse, delta, q_seg = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], qseg_ref[...]
    q_pos = q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)
    lo, hi = _key_block_range(i * bq, q_offset, window, bq=bq, bk=bk, num_k_blocks=num_k_blocks)

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k = k_ref[keys, :]
        mask = _mask(q_pos, j * bk + jnp.arange(bk, dtype=jnp.int32), q_seg, kseg_ref[keys], window)
        _, ds = _probs_and_dlogits(q, k, v_ref[keys, :], do, lse, delta, mask, scale=scale, softcap=softcap)
        return dq + jnp.dot(
            ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=common.dot_precision(k.dtype)
        )

    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _transposed_probs_and_dlogits(k, q, v, do, lse, delta, mask_t, *, scale, softcap):
    """`_probs_and_dlogits` transposed, (p.T [bk, bq], ds.T [bk, bq]) float32, computed as such: the key block's
    kernel then multiplies p.T @ do and ds.T @ q as they come, with no transpose of a register tile (which on a
    GPU goes through shared memory and holds both layouts in registers at once)."""
    s_t = _logits(k, q, scale=scale, softcap=softcap)  # [bk, bq]: k @ q.T
    p_t = jnp.where(mask_t, jnp.exp(s_t - lse[None, :]), 0.0)
    dp_t = jax.lax.dot_general(
        v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=common.dot_precision(v.dtype)
    )
    ds_t = p_t * (dp_t - delta[None, :])
    if softcap is not None:
        ds_t = ds_t * (1.0 - (s_t / softcap) ** 2)
    return p_t, ds_t * scale


def _dkv_kernel(
    meta_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    softcap,
    bq,
    bk,
    groups,
    num_q_blocks,
):
    j = pl.program_id(0)
    q_offset, window = meta_ref[0], meta_ref[1]
    k, v, k_seg = k_ref[...], v_ref[...], kseg_ref[...]  # [bk, D], [bk, D], [bk]
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
    lo, hi = _query_block_range(j * bk, q_offset, window, bq=bq, bk=bk, num_q_blocks=num_q_blocks)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    precision = common.dot_precision(k.dtype)
    for g in range(groups):  # the query heads that share this key/value head

        def body(i, carry, g=g):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]  # [bq, D]
            q_pos = q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)
            mask_t = _mask(q_pos, k_pos, qseg_ref[rows], k_seg, window, transposed=True)  # [bk, bq]
            p_t, ds_t = _transposed_probs_and_dlogits(
                k, q, v, do, lse_ref[g, rows], delta_ref[g, rows], mask_t, scale=scale, softcap=softcap
            )
            dv = dv + jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32, precision=precision)
            dk = dk + jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32, precision=precision)
            return dk, dv

        dk, dv = jax.lax.fori_loop(lo, hi, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _meta_spec():
    return pl.BlockSpec((2,), lambda *_: (0,))


def _forward(q, k, v, q_seg, k_seg, meta, *, scale, softcap, config: FlashConfig, interpret: bool):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    groups = h // hkv
    bq, bk = config.block_q, config.block_k
    kernel = functools.partial(_forward_kernel, scale=scale, softcap=softcap, bq=bq, bk=bk, num_k_blocks=s // bk)
    return pl.pallas_call(
        kernel,
        grid=(t // bq, b, h),
        in_specs=[
            _meta_spec(),
            pl.BlockSpec((None, bq, None, d), lambda i, n, j: (n, i, j, 0)),
            pl.BlockSpec((None, s, None, d), lambda i, n, j: (n, 0, j // groups, 0)),
            pl.BlockSpec((None, s, None, d), lambda i, n, j: (n, 0, j // groups, 0)),
            pl.BlockSpec((None, bq), lambda i, n, j: (n, i)),
            pl.BlockSpec((None, s), lambda i, n, j: (n, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, n, j: (n, i, j, 0)),
            pl.BlockSpec((None, None, bq), lambda i, n, j: (n, j, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="flash_attention_forward",
    )(meta, q, k, v, q_seg, k_seg)


def _backward(q, k, v, q_seg, k_seg, meta, out, lse, do, *, scale, softcap, config: FlashConfig, interpret: bool):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    groups = h // hkv
    bq, bk = config.block_q_bwd, config.block_k_bwd
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))  # rowsum(o * do)
    params = common.compiler_params(*config.backward_launch)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, softcap=softcap, bq=bq, bk=bk, num_k_blocks=s // bk),
        grid=(t // bq, b, h),
        in_specs=[
            _meta_spec(),
            pl.BlockSpec((None, bq, None, d), lambda i, n, j: (n, i, j, 0)),
            pl.BlockSpec((None, s, None, d), lambda i, n, j: (n, 0, j // groups, 0)),
            pl.BlockSpec((None, s, None, d), lambda i, n, j: (n, 0, j // groups, 0)),
            pl.BlockSpec((None, bq), lambda i, n, j: (n, i)),
            pl.BlockSpec((None, s), lambda i, n, j: (n, 0)),
            pl.BlockSpec((None, bq, None, d), lambda i, n, j: (n, i, j, 0)),
            pl.BlockSpec((None, None, bq), lambda i, n, j: (n, j, i)),
            pl.BlockSpec((None, None, bq), lambda i, n, j: (n, j, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, n, j: (n, i, j, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(meta, q, k, v, q_seg, k_seg, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, softcap=softcap, bq=bq, bk=bk, groups=groups, num_q_blocks=t // bq),
        grid=(s // bk, b, hkv),
        in_specs=[
            _meta_spec(),
            pl.BlockSpec((None, t, groups, d), lambda j, n, g: (n, 0, g, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, n, g: (n, j, g, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, n, g: (n, j, g, 0)),
            pl.BlockSpec((None, t), lambda j, n, g: (n, 0)),
            pl.BlockSpec((None, bk), lambda j, n, g: (n, j)),
            pl.BlockSpec((None, t, groups, d), lambda j, n, g: (n, 0, g, 0)),
            pl.BlockSpec((None, groups, t), lambda j, n, g: (n, g, 0)),
            pl.BlockSpec((None, groups, t), lambda j, n, g: (n, g, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, d), lambda j, n, g: (n, j, g, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, n, g: (n, j, g, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(meta, q, k, v, q_seg, k_seg, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_seg, k_seg, meta, scale, softcap, config, interpret):
    out, _ = _forward(q, k, v, q_seg, k_seg, meta, scale=scale, softcap=softcap, config=config, interpret=interpret)
    return out


def _flash_fwd(q, k, v, q_seg, k_seg, meta, scale, softcap, config, interpret):
    out, lse = _forward(q, k, v, q_seg, k_seg, meta, scale=scale, softcap=softcap, config=config, interpret=interpret)
    return out, (q, k, v, q_seg, k_seg, meta, out, lse)


def _flash_bwd(scale, softcap, config, interpret, residuals, do):
    q, k, v, q_seg, k_seg, meta, out, lse = residuals
    dq, dk, dv = _backward(
        q, k, v, q_seg, k_seg, meta, out, lse, do, scale=scale, softcap=softcap, config=config, interpret=interpret
    )
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x, axis, multiple, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _segments(q_segments, k_segments, k_valid, b, t, s):
    """int32 [B, T] and [B, S] segment ids, invalid keys set to a segment no query has."""
    if q_segments is None:
        q_seg, k_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    else:
        q_seg, k_seg = q_segments.astype(jnp.int32), k_segments.astype(jnp.int32)
    if k_valid is not None:
        k_seg = jnp.where(k_valid, k_seg, _INVALID_SEGMENT)
    return q_seg, k_seg


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    k_valid: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal grouped-query attention without the [H, T, S] scores: q [B, T, H, D], k and v [B, S, Hkv, D]
    -> [B, T, H, D] in q's dtype; differentiable in q, k and v.

    Args:
      scale: the logits' scale (usually D ** -0.5).
      q_segments [B, T], k_segments [B, S]: packed-example ids (both or neither); attention stays within one.
        No query segment may be -2**31 (that marks invalid keys).
      k_valid: bool [B, S], False for keys never attended to (padding, empty cache slots).
      q_offset: the sequence index of query 0 (the cache index when prefilling a KV cache); key s is at index s.
      window: a sliding window of this many tokens (the query included); None: none.
      softcap: Gemma 2's tanh soft-capping of the logits, cap * tanh(logits / cap).
      config: tile sizes (default `FlashConfig.for_head_dim(D)`); interpret: run in Pallas' interpreter (CPU).

    Sequences are padded to whole tiles, and D to a power of two (>= 16); the padding is sliced off.
    Raises ValueError for mismatched shapes or head counts.
    """
    b, t, h, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, S, Hkv, {d}] with B={b}, got {k.shape} and {v.shape}")
    s, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("pass both q_segments and k_segments, or neither")
    config = config or FlashConfig.for_head_dim(d)
    q_seg, k_seg = _segments(q_segments, k_segments, k_valid, b, t, s)
    tile_q = math.lcm(config.block_q, config.block_q_bwd)
    tile_k = math.lcm(config.block_k, config.block_k_bwd)
    d_pad = max(16, 1 << (d - 1).bit_length())
    qp = _pad_axis(_pad_axis(q, 3, d_pad), 1, tile_q)
    kp = _pad_axis(_pad_axis(k, 3, d_pad), 1, tile_k)
    vp = _pad_axis(_pad_axis(v, 3, d_pad), 1, tile_k)
    q_seg = _pad_axis(q_seg, 1, tile_q)
    k_seg = _pad_axis(k_seg, 1, tile_k, value=_INVALID_SEGMENT)
    meta = jnp.stack(
        [jnp.asarray(q_offset, jnp.int32), jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)]
    )
    out = _flash(
        qp, kp, vp, q_seg, k_seg, meta, float(scale), None if softcap is None else float(softcap), config, interpret
    )
    return out[:, :t, :, :d]


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    k_valid: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """`flash_attention` in plain JAX with the whole [B, H, T, S] scores in float32 (for tests): the same mask,
    and output 0 for a query that sees no key."""
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_seg, k_seg = _segments(q_segments, k_segments, k_valid, b, t, s)
    q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    window = NO_WINDOW if window is None else window
    mask = jax.vmap(lambda qs, ks: _mask(q_pos, jnp.arange(s, dtype=jnp.int32), qs, ks, window))(q_seg, k_seg)
    qg = q.astype(jnp.float32).reshape(b, t, hkv, h // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, h, d).astype(q.dtype)
