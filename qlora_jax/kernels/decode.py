"""The decode kernel: y = x @ dequantize(W).T for M <= 16 rows of x, streaming the packed 4-bit weight.

At small M the matmul is a read of the weight: 4.127 bits a value (NF4 with double quantization) instead of 16.
The kernel is built so that the read is all it does, and nothing in its inner loop depends on the data layout:

- **No nibble interleave.** Byte j of a weight row holds values 2j (high nibble) and 2j + 1 (low nibble). Instead
  of interleaving the two nibbles back into column order in registers, x is split once, outside the kernel, into
  its even and odd columns, and y = x[:, 0::2] @ W_hi.T + x[:, 1::2] @ W_lo.T, where W_hi / W_lo are the weight's
  high- and low-nibble planes ([N, K/2] each, read from the same bytes).
- **Block scales decoded once per call, outside the K loop**, by a small XLA op (`quant.decode_absmax`, 1/64 of
  the weight's values); the kernel reads float32 scales, one per (row, block), whatever the quantization variant.
- **Large loads per program**: a step reads `block_n` rows x `block_k / 2` contiguous bytes (as a
  [block_n, chunks, chunk / 2] tile when `block_k` spans several quantization blocks).
- **Split K** over programs so that every SM streams part of the weight; XLA adds the float32 partial sums
  (deterministic, unlike atomics).
- The dot is either CUDA-core multiply-adds (`dot="fma"`, M <= 4: no layout change for a tensor core, the
  [block_n, chunk / 2] products are summed in registers and reduced once at the end) or a tensor-core dot with M
  padded to 16 (`dot="mma"`).

Numerics are those of `nf4_matmul` (docs/kernels.md): each weight value is T[code] * absmax in float32, rounded to
the weight's own dtype (bitsandbytes' `dequantize_4bit`), then to x's dtype, multiplied by x exactly and summed in
float32. `decode_reference` is the same computation in plain JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import codebooks
from qlora_jax.kernels import common
from qlora_jax.quant import QuantizedTensor, decode_absmax

__all__ = ["DecodeConfig", "MAX_M", "FMA_MAX_M", "decode_pallas", "decode_reference", "decode_ladder", "LADDER"]

MAX_M = 16  # rows of x the decode kernel takes
FMA_MAX_M = 4  # at most this many with CUDA-core multiply-adds (one accumulator a row)
DOTS = ("fma", "mma")
LOOKUPS = ("gather", "select")
BLOCK_NS = (32, 64, 128, 256)
BLOCK_KS = (64, 128, 256, 512)
# The rungs of `decode_ladder`: each adds one step of the full kernel (rung 4).
LADDER = ("stream bytes", "split nibbles", "map codes", "scale and round", "dot")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Tiles and launch parameters of the decode kernel.

    Attributes:
      block_n: weight rows (output features) a program, one of BLOCK_NS.
      block_k: weight values (input features) a program reads per row and loop step, one of BLOCK_KS.
      split_k: programs along K (their float32 partial sums are added afterwards).
      dot: "fma" (CUDA cores, M <= FMA_MAX_M) or "mma" (tensor cores, M padded to 16).
      lookup: "gather" (the 16-entry code table, read through L1) or "select" (a 15-select tree over the 4 bits).
      num_warps, num_stages: Triton's launch parameters (stages: software pipelining of the loads).
    """

    block_n: int = 64
    block_k: int = 128
    split_k: int = 4
    dot: str = "mma"
    lookup: str = "gather"
    num_warps: int = 4
    num_stages: int = 3

    def check(self, *, m: int, n: int, k: int, blocksize: int) -> None:
        """Raises ValueError unless this config can run an [m, k] x [n, k]^T product with this blocksize."""
        del n
        if self.block_n not in BLOCK_NS:
            raise ValueError(f"block_n={self.block_n} must be one of {BLOCK_NS}")
        if self.block_k not in BLOCK_KS:
            raise ValueError(f"block_k={self.block_k} must be one of {BLOCK_KS}")
        if self.dot not in DOTS:
            raise ValueError(f"dot must be one of {DOTS}, got {self.dot!r}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {LOOKUPS}, got {self.lookup!r}")
        if self.split_k < 1 or k % (self.block_k * self.split_k):
            raise ValueError(f"in_features={k} must be a multiple of block_k * split_k = {self.block_k * self.split_k}")
        if k % blocksize:
            raise ValueError(f"in_features={k} must be a multiple of blocksize={blocksize}")
        if m > MAX_M:
            raise ValueError(f"the decode kernel takes at most {MAX_M} rows of x, got {m}")
        if self.dot == "fma" and m > FMA_MAX_M:
            raise ValueError(f'dot="fma" takes at most {FMA_MAX_M} rows of x, got {m}; use dot="mma"')

    def chunk(self, blocksize: int) -> int:
        """Values sharing one scale within a step: the quantization block, or the whole step if smaller."""
        return min(self.block_k, blocksize)


def _lookup(codes: jax.Array, table_ref: Any, quant_type: str, lookup: str) -> jax.Array:
    """float32 code values T[codes] for int32 codes in [0, 16)."""
    if lookup == "gather":
        return table_ref[codes]
    values = np.asarray(codebooks.code_table(quant_type), np.float32)
    level = [jnp.where((codes & 1) != 0, float(values[2 * i + 1]), float(values[2 * i])) for i in range(8)]
    for bit in (2, 4, 8):
        high = (codes & bit) != 0
        level = [jnp.where(high, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _decode_kernel(xe_ref, xo_ref, packed_ref, scales_ref, table_ref, o_ref, *, m, n, config, chunk, weight_dtype,
                   quant_type, stage):  # fmt: skip
    bn, nb, half = config.block_n, config.block_k // chunk, chunk // 2  # tile [bn, nb, half] of bytes
    j, split = pl.program_id(0), pl.program_id(1)
    n_start = j * bn
    rows_mask = n_start + jnp.arange(bn) < n
    mask3 = jnp.broadcast_to(rows_mask[:, None, None], (bn, nb, half))
    steps = packed_ref.shape[1] // nb // config.split_k
    x_dtype = xe_ref.dtype
    mma = config.dot == "mma" and stage == len(LADDER) - 1
    m_rows = 16 if mma else m

    def body(step, acc):
        c_start = (split * steps + step) * nb  # the first chunk of this step
        packed = plgpu.load(
            packed_ref.at[pl.ds(n_start, bn), pl.ds(c_start, nb), pl.ds(0, half)], mask=mask3, other=0
        ).astype(jnp.int32)  # [bn, nb, half]
        if stage == 0:
            return acc + jnp.sum(packed.astype(jnp.float32), axis=1)
        hi, lo = packed >> 4, packed & 0xF  # values 2j and 2j + 1
        if stage == 1:
            return acc + jnp.sum((hi + lo).astype(jnp.float32), axis=1)
        w_hi = _lookup(hi, table_ref, quant_type, config.lookup)
        w_lo = _lookup(lo, table_ref, quant_type, config.lookup)
        if stage == 2:
            return acc + jnp.sum(w_hi + w_lo, axis=1)
        scales = plgpu.load(scales_ref.at[pl.ds(n_start, bn), pl.ds(c_start, nb)], mask=rows_mask[:, None], other=0.0)[
            :, :, None
        ]  # [bn, nb, 1]
        # Scaled in float32, rounded to the weight's dtype (bitsandbytes' dequantize_4bit), then to x's dtype.
        w_hi = (w_hi * scales).astype(weight_dtype)
        w_lo = (w_lo * scales).astype(weight_dtype)
        if stage == 3:
            return acc + jnp.sum(w_hi.astype(jnp.float32) + w_lo.astype(jnp.float32), axis=1)
        if mma:
            k_start = c_start * half
            x_rows = jnp.arange(16) < m
            xe = plgpu.load(xe_ref.at[pl.ds(0, 16), pl.ds(k_start, nb * half)], mask=x_rows[:, None], other=0)
            xo = plgpu.load(xo_ref.at[pl.ds(0, 16), pl.ds(k_start, nb * half)], mask=x_rows[:, None], other=0)
            w_hi = w_hi.astype(x_dtype).reshape(bn, nb * half)
            w_lo = w_lo.astype(x_dtype).reshape(bn, nb * half)
            precision = common.dot_precision(x_dtype)
            acc = acc + jnp.dot(xe, w_hi.T, preferred_element_type=jnp.float32, precision=precision)
            return acc + jnp.dot(xo, w_lo.T, preferred_element_type=jnp.float32, precision=precision)
        w_hi = w_hi.astype(x_dtype).astype(jnp.float32)
        w_lo = w_lo.astype(x_dtype).astype(jnp.float32)
        out = []
        for row in range(m):  # one [bn, half] accumulator a row of x
            xe = plgpu.load(xe_ref.at[pl.ds(row, 1), pl.ds(c_start, nb), pl.ds(0, half)]).astype(jnp.float32)
            xo = plgpu.load(xo_ref.at[pl.ds(row, 1), pl.ds(c_start, nb), pl.ds(0, half)]).astype(jnp.float32)
            out.append(acc[row] + jnp.sum(w_hi * xe + w_lo * xo, axis=1))
        return tuple(out)

    if stage == len(LADDER) - 1 and not mma:
        init = tuple(jnp.zeros((bn, half), jnp.float32) for _ in range(m))
    elif mma:
        init = jnp.zeros((m_rows, bn), jnp.float32)
    else:
        init = jnp.zeros((bn, half), jnp.float32)
    acc = jax.lax.fori_loop(0, steps, body, init)
    if mma:
        rows = jnp.arange(16) < m
        plgpu.store(o_ref.at[split, pl.ds(0, 16), pl.ds(n_start, bn)], acc, mask=rows[:, None] & rows_mask[None, :])
        return
    accs = acc if isinstance(acc, tuple) else (acc,)
    for row, a in enumerate(accs):
        plgpu.store(o_ref.at[split, pl.ds(row, 1), pl.ds(n_start, bn)], jnp.sum(a, axis=1)[None, :],
                    mask=rows_mask[None, :])  # fmt: skip


def _check(x: jax.Array, qt: QuantizedTensor, config: DecodeConfig) -> None:
    if reason := common.fused_unsupported_reason(qt):
        raise ValueError(reason)
    n, k = qt.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got shape {x.shape}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    config.check(m=x.shape[0], n=n, k=k, blocksize=qt.blocksize)


def split_even_odd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x[:, 0::2], x[:, 1::2]: the columns that multiply the high and the low nibbles of each weight byte."""
    return x[:, 0::2], x[:, 1::2]


def chunk_scales(qt: QuantizedTensor, chunk: int) -> jax.Array:
    """float32[N, K / chunk]: the absmax of every chunk of `chunk` values (a block, or a part of one)."""
    n, k = qt.shape
    scales = decode_absmax(qt).reshape(n, k // qt.blocksize)
    return scales if chunk == qt.blocksize else jnp.repeat(scales, qt.blocksize // chunk, axis=1)


def _call(x: jax.Array, qt: QuantizedTensor, config: DecodeConfig, stage: int, interpret: bool) -> jax.Array:
    m, (n, k) = x.shape[0], qt.shape
    chunk = config.chunk(qt.blocksize)
    half = chunk // 2
    xe, xo = split_even_odd(x)  # [M, K/2] each
    mma = config.dot == "mma" and stage == len(LADDER) - 1
    if mma:  # the tensor-core dot reads [16, block_k / 2] rows of x: pad M to 16
        xe, xo = (jnp.pad(a, ((0, 16 - m), (0, 0))) for a in (xe, xo))
    else:
        xe, xo = (a.reshape(m, k // chunk, half) for a in (xe, xo))
    packed = jnp.asarray(qt.packed).reshape(n, k // chunk, half)
    table = jnp.asarray(codebooks.code_table(qt.quant_type))
    out_rows = (16 if mma else m) if stage == len(LADDER) - 1 else 1  # mma stores whole 16-row tiles
    kernel = functools.partial(
        _decode_kernel, m=m, n=n, config=config, chunk=chunk, weight_dtype=jnp.dtype(qt.dtype),
        quant_type=qt.quant_type, stage=stage,
    )  # fmt: skip
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((config.split_k, out_rows, n), jnp.float32),
        grid=(pl.cdiv(n, config.block_n), config.split_k),
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"nf4_decode_{qt.quant_type}",
    )(xe, xo, packed, chunk_scales(qt, chunk), table)
    return jnp.sum(partial, axis=0)[: m if stage == len(LADDER) - 1 else 1]  # [rows, N] float32


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_pallas(
    x: jax.Array, qt: QuantizedTensor, *, config: DecodeConfig = DecodeConfig(), interpret: bool = False
) -> jax.Array:
    """y[M, N] = x[M, K] @ dequantize(qt).T for M <= 16, in x's dtype, accumulated in float32.

    qt: an unstacked 2D weight (N, K) with K a multiple of its blocksize, any quant type, with or without double
    quantization. Raises ValueError for a config that cannot run this shape (see `DecodeConfig.check`) or an
    unsupported weight, TypeError for another x dtype.
    """
    _check(x, qt, config)
    return _call(x, qt, config, len(LADDER) - 1, interpret).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("config", "stage", "interpret"))
def decode_ladder(
    x: jax.Array, qt: QuantizedTensor, *, config: DecodeConfig, stage: int, interpret: bool = False
) -> jax.Array:
    """Rung `stage` of the decode kernel (LADDER[stage]) for benchmarks: the same program, stopped after that
    step, returning float32[1, N] row sums (stages < 4) so that nothing is optimized away; stage 4 is the kernel.
    One GPU run of every rung shows where the kernel's time goes (docs/kernels.md)."""
    if not 0 <= stage < len(LADDER):
        raise ValueError(f"stage must be in [0, {len(LADDER)}), got {stage}")
    _check(x, qt, config if stage == len(LADDER) - 1 else dataclasses.replace(config, dot="mma"))
    return _call(x, qt, config, stage, interpret)


def decode_reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """Plain JAX, the kernel's arithmetic: even/odd columns of x times the high/low nibble planes, each value
    T[code] * absmax rounded to the weight's dtype and then x's, products summed in float32 at full precision."""
    n, k = qt.shape
    packed = jnp.asarray(qt.packed).reshape(n, k // 2).astype(jnp.int32)
    table = jnp.asarray(codebooks.code_table(qt.quant_type))
    scales = jnp.repeat(decode_absmax(qt).reshape(n, k // qt.blocksize), qt.blocksize // 2, axis=1)  # [N, K/2]

    def plane(codes):
        w = (table[codes] * scales).astype(qt.dtype).astype(x.dtype)
        return jax.lax.stop_gradient(w.astype(jnp.float32))

    xe, xo = (a.astype(jnp.float32) for a in split_even_odd(x))
    highest = jax.lax.Precision.HIGHEST
    y = jnp.dot(xe, plane(packed >> 4).T, precision=highest) + jnp.dot(xo, plane(packed & 0xF).T, precision=highest)
    return y.astype(x.dtype)
