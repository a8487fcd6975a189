"""The decode kernel built up one step at a time, for `benchmarks/gpu.py ladder` (docs/kernels.md).

A kernel that is several times too slow does not say which step costs; a ladder of kernels over the same packed
weight, each adding one step, timed in one GPU run, does (the approach of public 4-bit GEMV optimisation guides):

0. stream the packed bytes and reduce them (the bandwidth a Pallas/Triton kernel reaches on this GPU);
1. + split the nibbles;
2. + map the codes to values (table gather, or a select tree);
3. + the block scales decoded in the kernel from the double-quantization statistics, scaled and rounded;
4. + the dot with x: the production kernel, `qlora_jax.kernels.decode.decode_pallas`.

Rungs 0-3 return float32[1, N] row sums (so that nothing is optimized away) and read the weight exactly as the
decode kernel does (the same stacked views, tiles, masks and scale decode); they live here, beside the benchmark,
not in the production kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import codebooks
from qlora_jax.kernels import common
from qlora_jax.kernels.decode import DecodeConfig, block_scales, decode_pallas, lookup_codes, stacked_operands
from qlora_jax.quant import QuantizedTensor

__all__ = ["LADDER", "ladder"]

LADDER = ("stream bytes", "split nibbles", "map codes", "scale and round", "dot")


def _rung_kernel(layer_ref, table_ref, dyn_ref, *refs, config, chunk, layout, stage):
    weight_refs, o_ref = refs[:-1], refs[-1]
    bn, half = config.block_n, chunk // 2
    nb = config.block_k // chunk
    tile, split = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    n_start = tile * bn
    rows = n_start + jnp.arange(bn)
    row_mask = rows < layout.n
    mask3 = jnp.broadcast_to(row_mask[:, None, None], (bn, nb, half))
    steps = layout.k // chunk // nb // config.split_k

    def body(step, acc):
        c_start = (split * steps + step) * nb
        packed = plgpu.load(
            weight_refs[0].at[layer, pl.ds(n_start, bn), pl.ds(c_start, nb), pl.ds(0, half)], mask=mask3, other=0
        ).astype(jnp.int32)
        if stage == 0:
            return acc + jnp.sum(packed.astype(jnp.float32), axis=(1, 2))
        hi, lo = packed >> 4, packed & 0xF
        if stage == 1:
            return acc + jnp.sum((hi + lo).astype(jnp.float32), axis=(1, 2))
        w_hi, w_lo = (lookup_codes(c, table_ref, layout.quant_type, config.lookup) for c in (hi, lo))
        if stage == 2:
            return acc + jnp.sum(w_hi + w_lo, axis=(1, 2))
        scales = block_scales(
            weight_refs, dyn_ref, layer, n_start, rows, row_mask, c_start * chunk // layout.blocksize, nb, layout
        )[:, :, None]
        w_hi = (w_hi * scales).astype(layout.weight_dtype).astype(jnp.float32)
        w_lo = (w_lo * scales).astype(layout.weight_dtype).astype(jnp.float32)
        return acc + jnp.sum(w_hi + w_lo, axis=(1, 2))

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn,), jnp.float32))
    plgpu.store(o_ref.at[split, pl.ds(0, 1), pl.ds(n_start, bn)], acc[None, :], mask=row_mask[None, :])


@functools.partial(jax.jit, static_argnames=("config", "stage", "interpret"))
def ladder(x: jax.Array, qt: QuantizedTensor, *, config: DecodeConfig, stage: int, interpret: bool = False):
    """Rung `stage` (LADDER[stage]) over an unstacked weight: float32[1, N] row sums for stages 0-3, the decode
    kernel's y for stage 4. Raises ValueError for a stage outside the ladder or a config the kernel rejects."""
    if not 0 <= stage < len(LADDER):
        raise ValueError(f"stage must be in [0, {len(LADDER)}), got {stage}")
    if stage == len(LADDER) - 1:
        return decode_pallas(x, qt, config=config, interpret=interpret)
    n, k = qt.shape
    config.check(m=1, n=n, k=k, blocksize=qt.blocksize)
    chunk = config.chunk(qt.blocksize)
    arrays, layout = stacked_operands(qt, chunk)
    tables = [jnp.asarray(codebooks.code_table(qt.quant_type)), jnp.asarray(codebooks.DYNAMIC_CODE)]
    kernel = functools.partial(_rung_kernel, config=config, chunk=chunk, layout=layout, stage=stage)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((config.split_k, 1, n), jnp.float32),
        grid=(pl.cdiv(n, config.block_n), config.split_k),
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"nf4_ladder_{stage}",
    )(jnp.zeros((1,), jnp.int32), *tables, *arrays)
    return jnp.sum(partial, axis=0)
