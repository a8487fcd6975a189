"""Fused 4-bit dequantize-matmul, forward (y = x @ W.T) and backward (dx = dy @ W), as Pallas Triton kernels.

The weight is read packed (4.127 bits a value with double quantization) and dequantized tile by tile in
registers; it never exists in 16 bits in GPU memory. The forward kernel covers both regimes with one body:
large M (training) tiles M and N; small M (decode) uses block_m=16 and splits K across programs so the whole GPU
streams the weight, the partial sums being added afterwards (deterministically, unlike atomics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax.kernels import common
from qlora_jax.quant import QuantizedTensor, dequantize

__all__ = [
    "MatmulConfig",
    "matmul_pallas",
    "matmul_transposed_pallas",
    "matmul_reference",
    "matmul_transposed_reference",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulConfig:
    """Tile sizes and launch parameters of one fused kernel launch.

    block_k must divide the weight's blocksize (so a tile row has one absmax) and be at least 32 (16-bit dots
    need 16 on each side). split_k > 1 only applies to the forward kernel.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def check(self, *, m: int, n: int, k: int, blocksize: int) -> None:
        del m, n
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value not in common.TILE_SIZES:
                raise ValueError(f"{name}={value} must be one of {common.TILE_SIZES}")
        if self.block_k < 32 or blocksize % self.block_k:
            raise ValueError(f"block_k={self.block_k} must be >= 32 and divide blocksize={blocksize}")
        if k % (self.block_k * self.split_k):
            raise ValueError(f"in_features={k} must be a multiple of block_k * split_k = {self.block_k * self.split_k}")


def _forward_kernel(x_ref, *refs, m, n, k, blocksize, dq_blocksize, config: MatmulConfig, out_dtype, weight_dtype):
    packed_ref, absmax_ref, dq_refs, table_ref, (o_ref,) = common.split_refs(refs, dq_blocksize is not None)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m_start, n_start = i * bm, j * bn
    m_mask = m_start + jnp.arange(bm) < m
    rows = n_start + jnp.arange(bn)  # rows of W = columns of y
    n_mask = rows < n
    steps = k // bk // config.split_k

    def body(step, acc):
        k_start = (split * steps + step) * bk
        scales = common.load_block_scales(
            absmax_ref,
            dq_refs,
            rows,
            n_mask,
            n_start,
            k_start // blocksize,
            num_rows=bn,
            blocks_per_row=k // blocksize,
            dq_blocksize=dq_blocksize,
        )
        x = plgpu.load(x_ref.at[pl.ds(m_start, bm), pl.ds(k_start, bk)], mask=m_mask[:, None], other=0)  # [bm, bk]
        w = common.load_weight_tile(
            packed_ref,
            table_ref,
            scales,
            n_mask,
            n_start,
            k_start,
            num_rows=bn,
            num_cols=bk,
            dtype=x.dtype,
            weight_dtype=weight_dtype,
        )  # [bn, bk]
        return acc + jnp.dot(x, w.T, preferred_element_type=jnp.float32, precision=common.dot_precision(x.dtype))

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    out = (
        o_ref.at[pl.ds(m_start, bm), pl.ds(n_start, bn)]
        if config.split_k == 1
        else o_ref.at[split, pl.ds(m_start, bm), pl.ds(n_start, bn)]
    )
    plgpu.store(out, acc.astype(out_dtype), mask=m_mask[:, None] & n_mask[None, :])


def _backward_kernel(dy_ref, *refs, m, n, k, blocksize, dq_blocksize, config: MatmulConfig, weight_dtype):
    packed_ref, absmax_ref, dq_refs, table_ref, (dx_ref,) = common.split_refs(refs, dq_blocksize is not None)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    i, kt = pl.program_id(0), pl.program_id(1)
    m_start, k_start = i * bm, kt * bk
    m_mask = m_start + jnp.arange(bm) < m
    block = k_start // blocksize  # one absmax per weight row across this program's columns

    def body(step, acc):
        n_start = step * bn
        rows = n_start + jnp.arange(bn)
        n_mask = rows < n
        scales = common.load_block_scales(
            absmax_ref,
            dq_refs,
            rows,
            n_mask,
            n_start,
            block,
            num_rows=bn,
            blocks_per_row=k // blocksize,
            dq_blocksize=dq_blocksize,
        )
        dy = plgpu.load(
            dy_ref.at[pl.ds(m_start, bm), pl.ds(n_start, bn)], mask=m_mask[:, None] & n_mask[None, :], other=0
        )  # [bm, bn]
        w = common.load_weight_tile(
            packed_ref,
            table_ref,
            scales,
            n_mask,
            n_start,
            k_start,
            num_rows=bn,
            num_cols=bk,
            dtype=dy.dtype,
            weight_dtype=weight_dtype,
        )  # [bn, bk]
        return acc + jnp.dot(dy, w, preferred_element_type=jnp.float32, precision=common.dot_precision(dy.dtype))

    acc = jax.lax.fori_loop(0, pl.cdiv(n, bn), body, jnp.zeros((bm, bk), jnp.float32))
    plgpu.store(dx_ref.at[pl.ds(m_start, bm), pl.ds(k_start, bk)], acc.astype(dx_ref.dtype), mask=m_mask[:, None])


def _check_activations(x: jax.Array, features: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != features:
        raise ValueError(f"{what} must be [M, {features}], got shape {x.shape}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def matmul_pallas(x: jax.Array, qt: QuantizedTensor, *, config: MatmulConfig, interpret: bool = False) -> jax.Array:
    """y[M, N] = x[M, K] @ dequantize(qt).T with float32 accumulation, y in x's dtype."""
    ops = common.weight_operands(qt)
    m, (n, k) = x.shape[0], qt.shape
    _check_activations(x, k, "x")
    config.check(m=m, n=n, k=k, blocksize=qt.blocksize)
    if m < config.block_m:  # a tile never reaches past its array (newer jax checks static slices)
        return matmul_pallas(jnp.pad(x, ((0, config.block_m - m), (0, 0))), qt, config=config, interpret=interpret)[:m]
    split = config.split_k
    out_dtype = x.dtype if split == 1 else jnp.float32
    out_shape = (m, n) if split == 1 else (split, m, n)
    kernel = functools.partial(
        _forward_kernel,
        m=m,
        n=n,
        k=k,
        blocksize=qt.blocksize,
        dq_blocksize=qt.dq_blocksize,
        config=config,
        out_dtype=out_dtype,
        weight_dtype=jnp.dtype(qt.dtype),
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(pl.cdiv(m, config.block_m), pl.cdiv(n, config.block_n), split),
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"nf4_matmul_{qt.quant_type}",
    )(x, *ops.arrays)
    return y if split == 1 else jnp.sum(y, axis=0).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def matmul_transposed_pallas(
    dy: jax.Array, qt: QuantizedTensor, *, config: MatmulConfig, interpret: bool = False
) -> jax.Array:
    """dx[M, K] = dy[M, N] @ dequantize(qt) with float32 accumulation, dx in dy's dtype (the backward of y)."""
    ops = common.weight_operands(qt)
    m, (n, k) = dy.shape[0], qt.shape
    _check_activations(dy, n, "dy")
    if config.split_k != 1:
        raise ValueError(f"the transposed kernel does not split; got split_k={config.split_k}")
    config.check(m=m, n=n, k=k, blocksize=qt.blocksize)
    if m < config.block_m:
        padded = jnp.pad(dy, ((0, config.block_m - m), (0, 0)))
        return matmul_transposed_pallas(padded, qt, config=config, interpret=interpret)[:m]
    kernel = functools.partial(
        _backward_kernel,
        m=m,
        n=n,
        k=k,
        blocksize=qt.blocksize,
        dq_blocksize=qt.dq_blocksize,
        config=config,
        weight_dtype=jnp.dtype(qt.dtype),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, k), dy.dtype),
        grid=(pl.cdiv(m, config.block_m), k // config.block_k),
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"nf4_matmul_transposed_{qt.quant_type}",
    )(dy, *ops.arrays)


def reference_weight(qt: QuantizedTensor, dtype: Any) -> jax.Array:
    """The weight a matmul with `dtype` activations multiplies by, as bitsandbytes' `matmul_4bit` forms it:
    `dequantize_4bit(W)` in the weight's own dtype (qt.dtype), then cast to the activations' dtype; as float32."""
    w = dequantize(qt).astype(dtype)
    return jax.lax.stop_gradient(w.astype(jnp.float32))


def matmul_reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """Plain JAX: x @ W.T with W = `reference_weight(qt, x.dtype)`, products summed in float32 at full precision,
    cast to x's dtype."""
    y = jnp.dot(x.astype(jnp.float32), reference_weight(qt, x.dtype).T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def matmul_transposed_reference(dy: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """Plain JAX: dx = dy @ W, W as in `matmul_reference`."""
    w = reference_weight(qt, dy.dtype)
    return jnp.dot(dy.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(dy.dtype)
