"""What every 4-bit Pallas kernel shares: the weight's 2D operands and the in-kernel decode of a weight tile.

A weight W[N, K] is stored row-major and flat, so with K a multiple of the blocksize its packed codes view as
uint8[N, K / 2] and its absmax as [N, K / blocksize]: a tile of W never straddles two rows' blocks. Kernels read
the 16-entry code table (and the 256-entry dynamic map for double quantization) as small arrays that stay in L1;
unpacking, the absmax decode and the scaling all happen on the tile, in registers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import codebooks
from qlora_jax.quant import QuantizedTensor, round_before_add

__all__ = [
    "WeightOperands",
    "weight_operands",
    "operand_arrays",
    "fused_unsupported_reason",
    "compiler_params",
    "load_block_scales",
]

TILE_SIZES = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class WeightOperands:
    """The arrays a kernel reads for one weight, and the static facts it needs about them."""

    arrays: tuple[jax.Array, ...]  # packed [N, K/2], absmax [N, K/bs], (nested, offset[1], dynamic map), code table
    out_features: int
    in_features: int
    blocksize: int
    dq_blocksize: int | None


def fused_unsupported_reason(qt: QuantizedTensor, *, stacked: bool = False) -> str | None:
    """Why the fused kernels cannot take this weight (one layer of it, when `stacked`), or None if they can."""
    if len(qt.shape) != 2:
        return f"the weight must be 2D (out_features, in_features), got shape {qt.shape}"
    if not stacked and len(qt.packed.shape) != 1:
        return f"the weight is stacked (packed shape {qt.packed.shape}); map over its leading axis"
    _, k = qt.shape
    if k % qt.blocksize:
        return f"in_features={k} must be a multiple of blocksize={qt.blocksize} for the fused kernels"
    return None


def operand_arrays(qt: QuantizedTensor, rows: int) -> list[jax.Array]:
    """The arrays a kernel reads for one weight, its packed codes and absmax viewed as `rows` rows: packed
    uint8[rows, -1], absmax [rows, -1], with double quantization the nested absmax, the offset [1] and the dynamic
    map, then the code table. (Rows never split a quantization block when each holds whole blocks.)"""
    arrays = [jnp.asarray(qt.packed).reshape(rows, -1), jnp.asarray(qt.absmax).reshape(rows, -1)]
    if qt.double_quant:
        arrays += [
            jnp.asarray(qt.nested_absmax, jnp.float32),
            jnp.asarray(qt.offset, jnp.float32).reshape(1),
            jnp.asarray(codebooks.DYNAMIC_CODE),
        ]
    arrays.append(jnp.asarray(codebooks.code_table(qt.quant_type)))
    return arrays


def weight_operands(qt: QuantizedTensor) -> WeightOperands:
    """The operands of an unstacked 2D weight, rows = out_features. Raises ValueError for another layout."""
    if reason := fused_unsupported_reason(qt):
        raise ValueError(reason)
    n, k = qt.shape
    return WeightOperands(tuple(operand_arrays(qt, n)), n, k, qt.blocksize, qt.dq_blocksize)


def compiler_params(num_warps: int, num_stages: int) -> Any:
    # Passing Triton compiler params is also what selects the Triton backend (jax 0.10 defaults to Mosaic GPU).
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def split_refs(refs: tuple[Any, ...], double_quant: bool, num_outputs: int = 1):
    """(packed, absmax, dq_refs | None, table, outputs) from a kernel's weight and output refs."""
    packed_ref, absmax_ref, *rest = refs
    dq_refs = tuple(rest[:3]) if double_quant else None
    rest = rest[3:] if double_quant else rest
    table_ref, *outputs = rest
    assert len(outputs) == num_outputs
    return packed_ref, absmax_ref, dq_refs, table_ref, outputs


def load_block_scales(
    absmax_ref: Any,
    dq_refs: tuple[Any, Any, Any] | None,
    rows: jax.Array,
    row_mask: jax.Array,
    row_start: Any,
    block: Any,
    *,
    num_rows: int,
    blocks_per_row: int,
    dq_blocksize: int | None,
) -> jax.Array:
    """float32[R] absmax of block `block` (a block index within the row) of the R rows starting at `row_start`."""
    block = jnp.asarray(block, jnp.int32)  # a Python int index trips the interpreter's load rule
    scale_slice = absmax_ref.at[pl.ds(row_start, num_rows), block]
    if dq_refs is None:
        return plgpu.load(scale_slice, mask=row_mask, other=0.0)
    nested_ref, offset_ref, dynamic_ref = dq_refs
    codes = plgpu.load(scale_slice, mask=row_mask, other=0).astype(jnp.int32)
    nested_index = (rows * blocks_per_row + block) // dq_blocksize
    nested = nested_ref[jnp.where(row_mask, nested_index, 0)]  # a gather; masked rows read entry 0
    return round_before_add(dynamic_ref[codes] * nested) + offset_ref[0]


def load_weight_tile(
    packed_ref: Any,
    table_ref: Any,
    scales: jax.Array,
    row_mask: jax.Array,
    row_start: Any,
    col_start: Any,
    *,
    num_rows: int,
    num_cols: int,
    dtype: Any,
    weight_dtype: Any = None,
) -> jax.Array:
    """The dequantized tile W[row_start : +num_rows, col_start : +num_cols] in `dtype` ([R, C]), rounded first to
    `weight_dtype` (the weight's own dtype, as bitsandbytes' `dequantize_4bit` returns it) when given."""
    packed = plgpu.load(
        packed_ref.at[pl.ds(row_start, num_rows), pl.ds(col_start // 2, num_cols // 2)],
        mask=row_mask[:, None],
        other=0,
    ).astype(jnp.int32)
    # The first value of a pair sits in the high nibble; interleave back to column order.
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(num_rows, num_cols)
    # Scaled in float32 and then rounded, exactly as `dequantize` does, so the tile equals the dequantized weight.
    tile = table_ref[codes] * scales[:, None]
    if weight_dtype is not None:
        tile = tile.astype(weight_dtype)
    return tile.astype(dtype)


def dot_precision(dtype: Any) -> Any:
    """float32 inputs get a true float32 product (not TF32); 16-bit inputs use the tensor cores as they are."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _zero_cotangent(a: Any) -> Any:
    dtype = jnp.result_type(a)
    if jnp.issubdtype(dtype, jnp.integer):
        return np.zeros(jnp.shape(a), jax.dtypes.float0)
    return jnp.zeros(jnp.shape(a), dtype)


def zero_cotangents(qt: QuantizedTensor) -> QuantizedTensor:
    """The cotangent of a frozen weight: zeros (float0 for its integer buffers); it never trains."""
    return jax.tree.map(_zero_cotangent, qt)
