"""Grouped matmuls: rows sorted by group (a mixture of experts' tokens sorted by expert), each group multiplied by
its own weight, one group's weight in memory at a time.

    y[rows of group g] = x[rows of group g] @ W_g.T          x [M, K], W_g [N, K], group_sizes [G], sum <= M

Rows past sum(group_sizes) come out zero. The loop runs over groups (`lax.fori_loop`), and within a group over
tiles of `tile` rows (a trip count that depends on the group's size, so no row of another group is computed and
no group is padded); a tile's rows past its group keep what is already there. Every shape is static; the group
sizes are data.

- `grouped_matmul(x, w, group_sizes)`: a dense W [G, N, K] that trains (LoRA's A and B of every expert): gradients
  for x and W (dW_g = dy_g.T @ x_g, accumulated tile by tile in float32).
- `grouped_frozen_matmul(x, weights, group_sizes)`: a frozen W, dense [G, N, K] or 4-bit (a QuantizedTensor with
  leading [G, P] axes of P parts [N / P, K] each, the way bitsandbytes quantizes each expert's nn.Linear), whose
  group's weight is dequantized inside the loop (bitsandbytes' `dequantize_4bit` then a cast to x's dtype, as
  `nf4_matmul` multiplies): the whole stack of dequantized weights never exists, in the forward or the backward
  pass. Gradient for x only (dx = dy_g @ W_g, recomputing each group's dequantization); the weight gets zeros.
- `grouped_matmul_reference`: the plain version, every row's weight gathered (for tests).

`jax.lax.ragged_dot` computes the same product; on CPU (and on GPU without its Pallas lowering) XLA expands it to a
dense [G, M, K] product, G times the work, and it needs the whole [G, N, K] weight stack.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.kernels.common import dot_precision, zero_cotangents
from qlora_jax.quant import QuantizedTensor, dequantize

__all__ = ["DEFAULT_TILE", "grouped_matmul", "grouped_frozen_matmul", "grouped_matmul_reference", "group_weight"]

DEFAULT_TILE = 128  # rows a matmul of the loop; the last tile of a group is partly another group's, and kept


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=dot_precision(a.dtype))


def group_weight(weights: Any, g: jax.Array, dtype: Any) -> jax.Array:
    """Group g's weight [N, K] in `dtype`: a slice of a dense [G, N, K] stack, or a 4-bit [G, P, ...] stack's P
    parts dequantized (to their own dtype, then cast, as bitsandbytes' matmul_4bit does) and stacked on N."""
    if isinstance(weights, QuantizedTensor):
        part = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, 0, keepdims=False), weights)  # [P, ...]
        w = jax.vmap(dequantize)(part)  # [P, N / P, K] in the weight's dtype
        return w.reshape(-1, w.shape[-1]).astype(dtype)
    return jax.lax.dynamic_index_in_dim(weights, g, 0, keepdims=False).astype(dtype)


def _out_features(weights: Any) -> int:
    if isinstance(weights, QuantizedTensor):
        return weights.packed.shape[1] * weights.shape[0]
    return weights.shape[1]


def _in_features(weights: Any) -> int:
    return weights.shape[-1]


def _num_groups(weights: Any) -> int:
    return (weights.packed if isinstance(weights, QuantizedTensor) else weights).shape[0]


def _check(x: jax.Array, weights: Any, group_sizes: jax.Array, tile: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [rows, in_features], got shape {x.shape}")
    if isinstance(weights, QuantizedTensor):
        if weights.packed.ndim != 3 or len(weights.shape) != 2:
            raise ValueError(
                f"a 4-bit weight stack needs packed [groups, parts, bytes] and a 2D shape, got packed "
                f"{weights.packed.shape} of shape {weights.shape}"
            )
    elif weights.ndim != 3:
        raise ValueError(f"w must be [groups, out_features, in_features], got shape {weights.shape}")
    if x.shape[1] != _in_features(weights):
        raise ValueError(f"x has {x.shape[1]} features, the weights take {_in_features(weights)}")
    if group_sizes.shape != (_num_groups(weights),):
        raise ValueError(f"group_sizes must be [{_num_groups(weights)}] (one per group), got {group_sizes.shape}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")


def _for_each_tile(group_sizes: jax.Array, rows: int, tile: int, body, init):
    """init threaded through body(g, row, keep, carry) for every tile of every group: `row` the tile's first row,
    `keep` bool[tile], True for the tile's rows in group g."""
    starts = jnp.cumsum(group_sizes) - group_sizes

    def per_group(g, carry):
        start, size = starts[g], group_sizes[g]

        def per_tile(t, carry):
            keep = t * tile + jnp.arange(tile) < size
            return body(g, start + t * tile, keep, carry)

        return jax.lax.fori_loop(0, (size + tile - 1) // tile, per_tile, carry)

    return jax.lax.fori_loop(0, group_sizes.shape[0], per_group, init)


def _grouped(x: jax.Array, weights: Any, group_sizes: jax.Array, tile: int, transpose: bool) -> jax.Array:
    """y[rows of g] = x[rows of g] @ W_g.T (W_g when `transpose`), in x's dtype, accumulated in float32."""
    m = x.shape[0]
    n = _in_features(weights) if transpose else _out_features(weights)
    tile = max(1, min(tile, m))
    padded = jnp.pad(x, ((0, tile), (0, 0)))  # a group's last tile may run past the last row

    def body(g, row, keep, y):
        w = group_weight(weights, g, x.dtype)  # recomputed per tile only by XLA's choice; one group's at most
        rows = jax.lax.dynamic_slice_in_dim(padded, row, tile)
        out = _dot(rows, w if transpose else w.T).astype(x.dtype)
        old = jax.lax.dynamic_slice_in_dim(y, row, tile)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep[:, None], out, old), row, 0)

    y = _for_each_tile(group_sizes, m, tile, body, jnp.zeros((m + tile, n), x.dtype))
    return y[:m]


def _weight_grads(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, tile: int, dtype: Any) -> jax.Array:
    """dW [G, N, K] = per group sum over its rows of dy_row^T x_row, accumulated in float32."""
    m, k = x.shape
    n = dy.shape[1]
    tile = max(1, min(tile, m))
    x_pad, dy_pad = jnp.pad(x, ((0, tile), (0, 0))), jnp.pad(dy, ((0, tile), (0, 0)))

    def body(g, row, keep, dw):
        xs = jnp.where(keep[:, None], jax.lax.dynamic_slice_in_dim(x_pad, row, tile), 0)
        dys = jax.lax.dynamic_slice_in_dim(dy_pad, row, tile)
        return dw.at[g].add(_dot(dys.T, xs))

    dw = _for_each_tile(group_sizes, m, tile, body, jnp.zeros((group_sizes.shape[0], n, k), jnp.float32))
    return dw.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _trained(x, w, group_sizes, tile):
    return _grouped(x, w, group_sizes, tile, transpose=False)


def _trained_fwd(x, w, group_sizes, tile):
    return _grouped(x, w, group_sizes, tile, transpose=False), (x, w, group_sizes)


def _trained_bwd(tile, residuals, dy):
    x, w, group_sizes = residuals
    dx = _grouped(dy, w, group_sizes, tile, transpose=True)
    dw = _weight_grads(x.astype(dy.dtype), dy, group_sizes, tile, w.dtype)
    return dx, dw, zero_cotangents(group_sizes)


_trained.defvjp(_trained_fwd, _trained_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _frozen(x, weights, group_sizes, tile):
    return _grouped(x, weights, group_sizes, tile, transpose=False)


def _frozen_fwd(x, weights, group_sizes, tile):
    return _grouped(x, weights, group_sizes, tile, transpose=False), (weights, group_sizes)  # no 16-bit copy kept


def _frozen_bwd(tile, residuals, dy):
    weights, group_sizes = residuals
    dx = _grouped(dy, weights, group_sizes, tile, transpose=True)
    zeros = zero_cotangents(weights) if isinstance(weights, QuantizedTensor) else jnp.zeros_like(weights)
    return dx, zeros, zero_cotangents(group_sizes)


_frozen.defvjp(_frozen_fwd, _frozen_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, tile: int = DEFAULT_TILE) -> jax.Array:
    """x [M, K] (rows sorted by group) times each group's w[g] [N, K] transposed -> [M, N] in x's dtype (w cast to
    it, products summed in float32); rows past sum(group_sizes) are zero. Differentiable in x and w.

    Raises ValueError for shapes that do not fit (x 2D, w [G, N, K], group_sizes [G]) or tile < 1.
    """
    _check(x, w, group_sizes, tile)
    return _trained(x, w, group_sizes.astype(jnp.int32), tile)


def grouped_frozen_matmul(x: jax.Array, weights: Any, group_sizes: jax.Array, *, tile: int = DEFAULT_TILE) -> jax.Array:
    """x [M, K] (rows sorted by group) times each group's frozen weight transposed -> [M, N] in x's dtype.

    weights: a dense [G, N, K] array, or a QuantizedTensor whose buffers lead with [G, P] (P parts of shape
    `weights.shape` = (N / P, K), stacked on N: a mixture of experts' gate and up projections). Each group's weight
    is dequantized inside the loop, in the forward pass and again in the backward pass; the gradient is for x only.
    """
    _check(x, weights, group_sizes, tile)
    if not isinstance(weights, QuantizedTensor):
        weights = jax.lax.stop_gradient(weights)
    return _frozen(x, weights, group_sizes.astype(jnp.int32), tile)


def grouped_matmul_reference(x: jax.Array, weights: Any, group_sizes: jax.Array) -> jax.Array:
    """The plain version: every row multiplied by its group's (dequantized) weight, gathered per row."""
    g = _num_groups(weights)
    stack = jnp.stack([group_weight(weights, jnp.int32(i), x.dtype) for i in range(g)])  # [G, N, K]
    rows = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")  # G past the last group
    inside = rows < g
    per_row = stack[jnp.minimum(rows, g - 1)]  # [M, N, K]
    y = jnp.einsum("mk,mnk->mn", x, per_row, preferred_element_type=jnp.float32, precision=dot_precision(x.dtype))
    return jnp.where(inside[:, None], y, 0).astype(x.dtype)
