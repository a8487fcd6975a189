"""The decode kernel: y = x @ dequantize(W).T for M <= 16 rows of x, streaming the packed 4-bit weight where it lies.

At small M the matmul is a read of the weight: 4.127 bits a value (NF4 with double quantization) instead of 16.
The kernel is built so that the read is all it does, and nothing else in the step touches the weight:

- **Weights read where they lie.** A weight may be one layer of a stack ([L, ...] buffers, what the decoder's layer
  scan holds): the kernel takes the whole stack and the layer index (an int32 operand read inside the kernel), so
  no slice of the stack is ever copied out before the call. Pallas' Triton backend has no scalar prefetch; the
  index is loaded from a one-element array and offsets every load.
- **Several weights, one call.** Weights that multiply the same x (q/k/v, gate/up) run as one launch, each
  program working on one tile of one of them (`decode_group_pallas`); x is read once per program, each weight
  keeps its own buffers and format (the stored bitsandbytes layout is never rearranged).
- **No nibble interleave, no split of x.** Byte j of a weight row holds values 2j (high nibble) and 2j + 1 (low
  nibble): y = x[:, 0::2] @ W_hi.T + x[:, 1::2] @ W_lo.T, with W_hi / W_lo the two nibble planes read from the
  same bytes. x is viewed (a free reshape) as [M, K / 2, 2] and each program loads its even and odd columns
  directly, so no XLA op splits x before the call.
- **Block scales decoded in the kernel** from what is stored: the 8-bit absmax codes, the nested float32 absmax
  and the offset (bitsandbytes' double quantization), or the float32 absmax. Nothing is decoded to float32 in HBM
  before the call.
- **Streaming loads.** A step reads `block_n` rows x `block_k / 2` contiguous bytes. `dot="mma"` feeds the tensor
  cores, and Triton's software pipeliner stages the loads through shared memory (`num_stages`); `dot="fma"`
  multiplies on CUDA cores and prefetches the next step's bytes into registers before it decodes the current
  ones, so its loads are in flight while it computes.
- **Split K** over programs so that every SM streams part of the weight; with `split_k=1` the kernel writes y in
  x's dtype and nothing runs after it; above, it writes float32 partial sums that XLA adds in the consumer's
  fusion (deterministic, unlike atomics).

Numerics are those of `nf4_matmul` (docs/kernels.md): each weight value is T[code] * absmax in float32, rounded to
the weight's own dtype (bitsandbytes' `dequantize_4bit`), then to x's dtype, multiplied by x exactly and summed in
float32. `decode_reference` is the same computation in plain JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import codebooks
from qlora_jax.hlo_report import KERNEL_BYTES_KEY
from qlora_jax.kernels import common
from qlora_jax.quant import QuantizedTensor, decode_absmax, round_before_add

__all__ = [
    "DecodeConfig",
    "MAX_M",
    "FMA_MAX_M",
    "decode_pallas",
    "decode_group_pallas",
    "decode_reference",
    "in_place_unsupported_reason",
    "lookup_codes",
    "block_scales",
    "stacked_operands",
    "WeightLayout",
]

MAX_M = 16  # rows of x the decode kernel takes
FMA_MAX_M = 4  # at most this many with CUDA-core multiply-adds (one accumulator a row)
DOTS = ("fma", "mma")
LOOKUPS = ("gather", "select")
BLOCK_NS = (16, 32, 64, 128, 256)
BLOCK_KS = (64, 128, 256, 512)
# Triton computes element offsets in int32: a stacked buffer must have fewer elements to be read in place.
MAX_STACK_ELEMENTS = 2**31 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Tiles and launch parameters of the decode kernel.

    Attributes:
      block_n: weight rows (output features) a program, one of BLOCK_NS.
      block_k: weight values (input features) a program reads per row and loop step, one of BLOCK_KS.
      split_k: programs along K (their float32 partial sums are added afterwards); 1 writes y directly.
      dot: "fma" (CUDA cores, M <= FMA_MAX_M, loads prefetched into registers) or "mma" (tensor cores, M padded
        to 16 in registers, loads pipelined through shared memory by Triton).
      lookup: "gather" (the 16-entry code table, read through L1) or "select" (a 15-select tree over the 4 bits).
      num_warps, num_stages: Triton's launch parameters (stages: software pipelining of the mma variant's loads).
    """

    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    dot: str = "mma"
    lookup: str = "select"
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
        if self.dot == "mma" and self.block_n < 16:
            raise ValueError(f'dot="mma" needs block_n >= 16, got {self.block_n}')
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


def lookup_codes(codes: jax.Array, table_ref: Any, quant_type: str, lookup: str) -> jax.Array:
    """float32 code values T[codes] for int32 codes in [0, 16): a gather from the table, or a select tree."""
    if lookup == "gather":
        return table_ref[codes]
    values = np.asarray(codebooks.code_table(quant_type), np.float32)
    level = [jnp.where((codes & 1) != 0, float(values[2 * i + 1]), float(values[2 * i])) for i in range(8)]
    for bit in (2, 4, 8):
        high = (codes & bit) != 0
        level = [jnp.where(high, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """The static facts of one weight a kernel needs to read it (`stacked_operands`)."""

    n: int
    k: int
    blocksize: int
    dq_blocksize: int | None
    nested_per_layer: int  # nested absmax values of one layer (double quantization)
    weight_dtype: Any
    quant_type: str


def _stack_size(qt: QuantizedTensor) -> int:
    """Layers stacked on the weight's leading axis (1 for an unstacked weight)."""
    return 1 if np.ndim(qt.packed) == 1 else int(np.shape(qt.packed)[0])


def in_place_unsupported_reason(qt: QuantizedTensor) -> str | None:
    """Why the kernel cannot read this stacked weight in place (it must be sliced first), or None."""
    if np.ndim(qt.packed) > 2:
        return f"the weight has {np.ndim(qt.packed) - 1} stacked axes; at most one (the layers) is read in place"
    if math.prod(np.shape(qt.packed)) > MAX_STACK_ELEMENTS:
        return f"the stacked packed buffer has {math.prod(np.shape(qt.packed))} elements, over Triton's int32 offsets"
    return None


def stacked_operands(qt: QuantizedTensor, chunk: int) -> tuple[list[jax.Array], WeightLayout]:
    """The stacked views the kernel reads: packed [L, N, K/chunk, chunk/2], absmax [L, N, K/bs], and with double
    quantization the nested absmax flat [L * blocks/dq_bs] and the offsets [L]. All free reshapes."""
    n, k = qt.shape
    layers, bs = _stack_size(qt), qt.blocksize
    arrays = [
        jnp.asarray(qt.packed).reshape(layers, n, k // chunk, chunk // 2),
        jnp.asarray(qt.absmax).reshape(layers, n, k // bs),
    ]
    nested_per_layer = 0
    if qt.double_quant:
        nested = jnp.asarray(qt.nested_absmax, jnp.float32).reshape(layers, -1)
        nested_per_layer = nested.shape[1]
        arrays += [nested.reshape(-1), jnp.asarray(qt.offset, jnp.float32).reshape(layers)]
    layout = WeightLayout(n, k, bs, qt.dq_blocksize, nested_per_layer, jnp.dtype(qt.dtype), qt.quant_type)
    return arrays, layout


def block_scales(refs, dyn_ref, layer, n_start, rows, row_mask, block, nbs, layout: WeightLayout) -> jax.Array:
    """float32[bn, nbs]: the absmax of blocks [block, block + nbs) of rows n_start.., decoded in registers."""
    absmax_ref = refs[1]
    tile = absmax_ref.at[layer, pl.ds(n_start, rows.shape[0]), pl.ds(block, nbs)]
    if layout.dq_blocksize is None:
        return plgpu.load(tile, mask=row_mask[:, None], other=0.0)
    nested_ref, offset_ref = refs[2], refs[3]
    codes = plgpu.load(tile, mask=row_mask[:, None], other=0).astype(jnp.int32)
    blocks = rows[:, None] * (layout.k // layout.blocksize) + block + jnp.arange(nbs)[None, :]
    index = jnp.where(row_mask[:, None], blocks // layout.dq_blocksize, 0) + layer * layout.nested_per_layer
    nested = nested_ref[index]  # a gather of a few entries, through L1
    return round_before_add(dyn_ref[codes] * nested) + offset_ref[layer]


def _stream(
    x_ref, table_ref, dyn_ref, layer, refs, o_ref, tile, split, *, m, config, chunk, layout: WeightLayout, x_dtype
):
    """One program: rows [tile * bn, +bn) of one weight, its share `split` of K, into o_ref."""
    bn, half = config.block_n, chunk // 2
    nb = config.block_k // chunk  # chunks a step (each with one scale)
    packed_ref = refs[0]
    n_start = tile * bn
    rows = n_start + jnp.arange(bn)
    row_mask = rows < layout.n
    mask3 = jnp.broadcast_to(row_mask[:, None, None], (bn, nb, half))
    steps = layout.k // chunk // nb // config.split_k
    mma = config.dot == "mma"

    def load(step):
        step = jnp.minimum(step, steps - 1)  # the prefetch past the last step reloads it (never out of bounds)
        c_start = (split * steps + step) * nb
        packed = plgpu.load(
            packed_ref.at[layer, pl.ds(n_start, bn), pl.ds(c_start, nb), pl.ds(0, half)], mask=mask3, other=0
        )
        return c_start, packed

    def weights(c_start, packed):
        scales = block_scales(
            refs, dyn_ref, layer, n_start, rows, row_mask, c_start * chunk // layout.blocksize, nb, layout
        )[:, :, None]
        codes = packed.astype(jnp.int32)
        planes = []
        for nibble in (codes >> 4, codes & 0xF):  # values 2j, 2j + 1
            w = lookup_codes(nibble, table_ref, layout.quant_type, config.lookup) * scales
            # Scaled in float32, rounded to the weight's dtype (bitsandbytes' dequantize_4bit), then to x's dtype.
            planes.append(w.astype(layout.weight_dtype).astype(x_dtype))
        return planes  # [bn, nb, half] each

    def x_columns(c_start, first_row, num_rows, parity):
        """x[first_row : +num_rows, columns 2j + parity] of this step's chunks: [num_rows, nb, half]."""
        row_ok = first_row + jnp.arange(num_rows) < m
        return plgpu.load(
            x_ref.at[pl.ds(first_row, num_rows), pl.ds(c_start, nb), pl.ds(0, half), jnp.int32(parity)],
            mask=row_ok[:, None, None],
            other=0,
        )

    if mma:
        precision = common.dot_precision(x_dtype)

        def body(step, acc):
            c_start, packed = load(step)
            w_hi, w_lo = (w.reshape(bn, nb * half) for w in weights(c_start, packed))
            xe, xo = (x_columns(c_start, 0, MAX_M, p).reshape(MAX_M, nb * half) for p in (0, 1))
            acc = acc + jnp.dot(xe, w_hi.T, preferred_element_type=jnp.float32, precision=precision)
            return acc + jnp.dot(xo, w_lo.T, preferred_element_type=jnp.float32, precision=precision)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((MAX_M, bn), jnp.float32))  # [16, bn]
        out = o_ref.at[pl.ds(0, MAX_M), pl.ds(n_start, bn)]
        x_rows = jnp.arange(MAX_M) < m
        plgpu.store(out, acc.astype(o_ref.dtype), mask=x_rows[:, None] & row_mask[None, :])
        return

    def body(step, carry):
        accs, (c_start, packed) = carry
        following = load(step + 1)  # in flight while this step decodes and multiplies
        w_hi, w_lo = (w.astype(jnp.float32) for w in weights(c_start, packed))
        accs = tuple(
            acc
            + jnp.sum(
                w_hi * x_columns(c_start, row, 1, 0).astype(jnp.float32)
                + w_lo * x_columns(c_start, row, 1, 1).astype(jnp.float32),
                axis=1,
            )
            for row, acc in enumerate(accs)
        )
        return accs, following

    init = (tuple(jnp.zeros((bn, half), jnp.float32) for _ in range(m)), load(0))
    accs, _ = jax.lax.fori_loop(0, steps, body, init)
    for row, acc in enumerate(accs):  # one [bn, half] accumulator a row of x, reduced once
        out = o_ref.at[pl.ds(row, 1), pl.ds(n_start, bn)]
        plgpu.store(out, jnp.sum(acc, axis=1)[None, :].astype(o_ref.dtype), mask=row_mask[None, :])


def _kernel(layer_ref, x_ref, table_ref, dyn_ref, *refs, m, config, chunk, layouts, ref_counts, x_dtype):
    layer = layer_ref[0]
    weight_refs, out_refs = refs[: sum(ref_counts)], refs[sum(ref_counts) :]
    tile, split = pl.program_id(0), pl.program_id(1)
    start, first = 0, 0
    stream = functools.partial(
        _stream, x_ref, table_ref, dyn_ref, layer, m=m, config=config, chunk=chunk, x_dtype=x_dtype
    )
    for layout, count, o_ref in zip(layouts, ref_counts, out_refs, strict=True):
        tiles = pl.cdiv(layout.n, config.block_n)
        own = weight_refs[first : first + count]
        if len(layouts) == 1:
            stream(own, o_ref, tile, split, layout=layout)
        else:  # this program's tile belongs to one of the weights
            pl.when((tile >= start) & (tile < start + tiles))(
                functools.partial(
                    lambda own, o_ref, start, layout: stream(own, o_ref, tile - start, split, layout=layout),
                    own,
                    o_ref,
                    start,
                    layout,
                )
            )
        start, first = start + tiles, first + count


def _check(x: jax.Array, qts: Sequence[QuantizedTensor], layer: Any, config: DecodeConfig) -> None:
    if not qts:
        raise ValueError("decode_group_pallas needs at least one weight")
    first = qts[0]
    for qt in qts:
        n, k = qt.shape if len(qt.shape) == 2 else (None, None)
        if len(qt.shape) != 2 or k % qt.blocksize:
            raise ValueError(
                f"the decode kernel needs 2D weights with in_features a multiple of the blocksize, got {qt}"
            )
        if (qt.shape[1], qt.quant_type, qt.blocksize, qt.dq_blocksize, jnp.dtype(qt.dtype)) != (
            first.shape[1],
            first.quant_type,
            first.blocksize,
            first.dq_blocksize,
            jnp.dtype(first.dtype),
        ):
            raise ValueError(f"weights decoded in one call must share in_features and format: {first} vs {qt}")
        if reason := in_place_unsupported_reason(qt):
            raise ValueError(reason)
        if (layer is None) != (np.ndim(qt.packed) == 1):
            raise ValueError(f"a stacked weight needs its layer index and an unstacked one none ({qt}, {layer=})")
        if _stack_size(qt) != _stack_size(first):
            raise ValueError("weights decoded in one call must have the same number of stacked layers")
    k = first.shape[1]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got shape {x.shape}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    for qt in qts:
        config.check(m=x.shape[0], n=qt.shape[0], k=k, blocksize=qt.blocksize)


def _call(
    x: jax.Array, qts: Sequence[QuantizedTensor], layer: Any, config: DecodeConfig, interpret: bool
) -> tuple[jax.Array, ...]:
    m, k = x.shape
    first = qts[0]
    chunk = config.chunk(first.blocksize)
    arrays, layouts, counts = [], [], []
    for qt in qts:
        views, layout = stacked_operands(qt, chunk)
        arrays += views
        layouts.append(layout)
        counts.append(len(views))
    layer_index = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    split = config.split_k
    out_dtype = x.dtype if split == 1 else jnp.float32
    out_shapes = [
        jax.ShapeDtypeStruct((m, qt.shape[0]) if split == 1 else (split, m, qt.shape[0]), out_dtype) for qt in qts
    ]
    tables = [jnp.asarray(codebooks.code_table(first.quant_type)), jnp.asarray(codebooks.DYNAMIC_CODE)]
    one_layer = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays) // _stack_size(first)
    read = one_layer + x.size * x.dtype.itemsize + sum(t.nbytes for t in tables) + 4
    written = sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in out_shapes)
    kernel = functools.partial(
        _kernel, m=m, config=config, chunk=chunk, layouts=tuple(layouts), ref_counts=tuple(counts), x_dtype=x.dtype
    )
    # x and y are seen by every program as blocks of MAX_M rows (all of K, all of N): the tensor-core path loads and
    # stores 16 rows whatever M is. Rows past M are masked on the GPU (by the kernel, and since jax 0.12 also by
    # Pallas' bounds mask) and padded in interpret mode; a ref slice past the array is an error since jax 0.12.
    # With split_k > 1 each program sees its own split's [M, N] partial sums (the split axis squeezed).
    whole = pl.BlockSpec()  # the array itself
    x_spec = pl.BlockSpec((MAX_M, k // chunk, chunk // 2, 2), lambda tile, s: (0, 0, 0, 0))
    out_specs = [
        pl.BlockSpec((MAX_M, qt.shape[0]), lambda tile, s: (0, 0))
        if split == 1
        else pl.BlockSpec((pl.squeezed, MAX_M, qt.shape[0]), lambda tile, s: (s, 0, 0))
        for qt in qts
    ]
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        in_specs=[whole, x_spec, *[whole] * (len(tables) + len(arrays))],
        out_specs=out_specs,
        grid=(sum(pl.cdiv(qt.shape[0], config.block_n) for qt in qts), split),
        compiler_params=common.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"nf4_decode_{first.quant_type}",
        metadata={KERNEL_BYTES_KEY: json.dumps([int(read), int(written)])},  # one layer read, not the stack
    )(layer_index, x.reshape(m, k // chunk, chunk // 2, 2), *tables, *arrays)
    if split == 1:
        return tuple(outs)
    return tuple(jnp.sum(out, axis=0).astype(x.dtype) for out in outs)  # fused into the consumer by XLA


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_pallas(
    x: jax.Array,
    qt: QuantizedTensor,
    layer: jax.Array | None = None,
    *,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> jax.Array:
    """y[M, N] = x[M, K] @ dequantize(W).T for M <= 16, in x's dtype, accumulated in float32.

    qt: a 2D weight (N, K) with K a multiple of its blocksize, any quant type, with or without double quantization;
    or a stack of L such weights (buffers with a leading [L] axis) with `layer` (an int32 scalar, may be traced)
    naming the one to multiply by, read in place. Raises ValueError for a config that cannot run this shape (see
    `DecodeConfig.check`) or an unsupported weight, TypeError for another x dtype.
    """
    _check(x, (qt,), layer, config)
    return _call(x, (qt,), layer, config, interpret)[0]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_group_pallas(
    x: jax.Array,
    qts: tuple[QuantizedTensor, ...],
    layer: jax.Array | None = None,
    *,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """(x @ dequantize(W_i).T for each W_i of qts) in one launch: weights that read the same x (q/k/v, gate/up).

    The weights share in_features, quant type, blocksize and dtype (their out_features may differ) and are
    stacked alike (`layer` as for `decode_pallas`). Returns one [M, N_i] array a weight, in x's dtype.
    """
    _check(x, tuple(qts), layer, config)
    return _call(x, tuple(qts), layer, config, interpret)


def layer_of(qt: QuantizedTensor, layer: Any) -> QuantizedTensor:
    """The weight `layer` of a stacked QuantizedTensor (a dynamic slice of each buffer), or qt if layer is None."""
    return qt if layer is None else jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, False), qt)


def decode_reference(x: jax.Array, qt: QuantizedTensor, layer: jax.Array | None = None) -> jax.Array:
    """Plain JAX, the kernel's arithmetic: even/odd columns of x times the high/low nibble planes, each value
    T[code] * absmax rounded to the weight's dtype and then x's, products summed in float32 at full precision."""
    qt = layer_of(qt, layer)
    n, k = qt.shape
    packed = jnp.asarray(qt.packed).reshape(n, k // 2).astype(jnp.int32)
    table = jnp.asarray(codebooks.code_table(qt.quant_type))
    scales = jnp.repeat(decode_absmax(qt).reshape(n, k // qt.blocksize), qt.blocksize // 2, axis=1)  # [N, K/2]

    def plane(codes):
        w = (table[codes] * scales).astype(qt.dtype).astype(x.dtype)
        return jax.lax.stop_gradient(w.astype(jnp.float32))

    xe, xo = x[:, 0::2].astype(jnp.float32), x[:, 1::2].astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    y = jnp.dot(xe, plane(packed >> 4).T, precision=highest) + jnp.dot(xo, plane(packed & 0xF).T, precision=highest)
    return y.astype(x.dtype)
