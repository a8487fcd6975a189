"""Pallas dequantization: QuantizedTensor -> dense array, for the XLA-dot path on GPU and for merging.

The flat array is viewed as [blocks, blocksize] (blocks never straddle a row of that view), each program writes a
[block_rows, block_cols] tile, decoding the absmax (double quantization included) for its rows in registers.
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

__all__ = ["DequantConfig", "dequantize_pallas", "dequantize_reference", "dequant_unsupported_reason"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DequantConfig:
    """block_rows quantization blocks a program, block_cols values of each (at most the blocksize)."""

    block_rows: int = 32
    block_cols: int = 64
    num_warps: int = 4
    num_stages: int = 2


def dequant_unsupported_reason(qt: QuantizedTensor) -> str | None:
    if len(qt.packed.shape) != 1:
        return f"the tensor is stacked (packed shape {qt.packed.shape}); map over its leading axis"
    if qt.size % qt.blocksize:
        return f"its size {qt.size} is not a multiple of blocksize={qt.blocksize} (the last block is partial)"
    return None


def _dequant_kernel(*refs, num_blocks, blocksize, dq_blocksize, config: DequantConfig):
    packed_ref, absmax_ref, dq_refs, table_ref, (o_ref,) = common.split_refs(refs, dq_blocksize is not None)
    br, bc = config.block_rows, config.block_cols
    i, c = pl.program_id(0), pl.program_id(1)
    row_start, col_start = i * br, c * bc
    rows = row_start + jnp.arange(br)
    row_mask = rows < num_blocks
    # The absmax view is [blocks, 1]: block `0` of each row is the row's own block.
    scales = common.load_block_scales(
        absmax_ref, dq_refs, rows, row_mask, row_start, 0, num_rows=br, blocks_per_row=1, dq_blocksize=dq_blocksize
    )
    tile = common.load_weight_tile(
        packed_ref, table_ref, scales, row_mask, row_start, col_start, num_rows=br, num_cols=bc, dtype=o_ref.dtype
    )
    plgpu.store(o_ref.at[pl.ds(row_start, br), pl.ds(col_start, bc)], tile, mask=row_mask[:, None])


@functools.partial(jax.jit, static_argnames=("dtype", "config", "interpret"))
def dequantize_pallas(
    qt: QuantizedTensor, dtype: Any = None, *, config: DequantConfig = DequantConfig(), interpret: bool = False
) -> jax.Array:
    """The same values as `qlora_jax.quant.dequantize(qt, dtype)`, computed by one Pallas kernel."""
    if reason := dequant_unsupported_reason(qt):
        raise ValueError(f"dequantize_pallas: {reason}")
    dtype = jnp.dtype(qt.dtype if dtype is None else dtype)
    bs = qt.blocksize
    num_blocks = qt.num_blocks
    block_cols = min(config.block_cols, bs)
    if bs % block_cols or block_cols < 2:
        raise ValueError(f"block_cols={config.block_cols} must divide blocksize={bs}")
    config = dataclasses.replace(config, block_cols=block_cols)
    arrays = common.operand_arrays(qt, num_blocks)  # packed [blocks, bs / 2], absmax [blocks, 1]
    kernel = functools.partial(
        _dequant_kernel, num_blocks=num_blocks, blocksize=bs, dq_blocksize=qt.dq_blocksize, config=config
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_blocks, bs), dtype),
        grid=(pl.cdiv(num_blocks, config.block_rows), bs // block_cols),
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"dequantize_{qt.quant_type}",
    )(*arrays)
    return out.reshape(qt.shape)


def dequantize_reference(qt: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """Plain JAX (and bit-exact with bitsandbytes): `qlora_jax.quant.dequantize`."""
    return dequantize(qt, dtype)
