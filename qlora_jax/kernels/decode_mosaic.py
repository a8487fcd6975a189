"""The decode kernel a second time, on Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`, jax >= 0.11): y = x @ W.T
for M <= 16 rows of x, reading the packed 4-bit weight where it lies.

Pallas' Triton backend (`decode.py`) is deprecated since jax 0.11; this is the same product written for Hopper's
own machinery, after the design of JAX's Hopper mixed-type matmul and tokamax's quantized ragged dot (the weight as
the wgmma left operand, the tokens as N):

- One warpgroup a program owns 64 weight rows (wgmma's M) and streams them through shared memory with TMA:
  `emit_pipeline` keeps `max_concurrent_steps` steps of [64, 32] packed bytes (64 values a row) in flight.
- The layer of a stacked weight is read in place: the layer index is loaded in the kernel and is one coordinate
  of the TMA copy; nothing is sliced out before the call.
- Each step decodes its tile in registers (nibble planes, code values by a select tree, times the row's block
  scale, rounded to the weight's dtype and then x's), stores the two planes to shared memory in wgmma's swizzled
  layout and multiplies them with x's even / odd columns: [64, 32] @ [32, 16] twice, float32 accumulation.
- Split K over programs (`split_k`); the float32 partial sums are added by XLA.

What differs from the Triton kernel (measure before choosing it): the block scales are decoded to float32 by one
XLA fusion per call (`quant.decode_absmax`'s arithmetic on the stored 8-bit codes of that layer; +1 launch and
+1 bit a value of traffic), since Mosaic GPU has no gather for the 256-entry double-quantization map; x is
split, padded to 16 rows and transposed by XLA (a few KB); the weight needs out_features % 64 == 0 and a
blocksize that is a multiple of 64. It is selectable by name (`KernelOptions(impl="pallas",
decode_kernel="decode_mosaic")`) and is never chosen by `impl="auto"` until measured. Numerics are those of
`decode.decode_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import codebooks
from qlora_jax.kernels.decode import MAX_M, layer_of
from qlora_jax.quant import QuantizedTensor, round_before_add

__all__ = ["MosaicDecodeConfig", "decode_mosaic", "mosaic_unavailable_reason", "mosaic_unsupported_reason"]

ROWS = 64  # weight rows a program (wgmma's M)
STEP = 64  # weight values a row and step: 32 packed bytes
TOKENS = 16  # rows of x, padded (wgmma's N)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicDecodeConfig:
    """Launch parameters of the Mosaic GPU decode kernel (its tile is fixed: 64 rows x 64 values a step).

    Attributes:
      split_k: programs along K (float32 partial sums, added afterwards).
      max_concurrent_steps: pipeline depth, steps of TMA copies in flight.
    """

    split_k: int = 2
    max_concurrent_steps: int = 3

    def check(self, *, m: int, n: int, k: int, blocksize: int) -> None:
        """Raises ValueError unless this config can run an [m, k] x [n, k]^T product with this blocksize."""
        if m > MAX_M:
            raise ValueError(f"the decode kernel takes at most {MAX_M} rows of x, got {m}")
        if n % ROWS:
            raise ValueError(f"the Mosaic decode kernel needs out_features % {ROWS} == 0, got {n}")
        if blocksize % STEP or k % blocksize:
            raise ValueError(
                f"the Mosaic decode kernel needs a blocksize multiple of {STEP} dividing {k=}, got {blocksize}"
            )
        if self.split_k < 1 or k % (STEP * self.split_k):
            raise ValueError(f"in_features={k} must be a multiple of {STEP} * split_k = {STEP * self.split_k}")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"max_concurrent_steps must be >= 1, got {self.max_concurrent_steps}")


def mosaic_unavailable_reason() -> str | None:
    """Why this jax cannot run or lower the Mosaic GPU kernel (None when it can)."""
    version = tuple(int(p) for p in importlib.metadata.version("jax").split(".")[:2])
    if version < (0, 11):
        return f"Mosaic GPU's decode kernel needs jax >= 0.11 (its CPU interpreter and lowering); this is jax {version}"
    return None


def mosaic_unsupported_reason(qt: QuantizedTensor) -> str | None:
    """Why the Mosaic decode kernel cannot take this weight (one layer of it, if stacked), or None."""
    if len(qt.shape) != 2:
        return f"the weight must be 2D, got shape {qt.shape}"
    n, k = qt.shape
    try:
        MosaicDecodeConfig(split_k=1).check(m=1, n=n, k=k, blocksize=qt.blocksize)
    except ValueError as e:
        return str(e)
    return None


def _select_table(codes: jax.Array, quant_type: str) -> jax.Array:
    """float32 T[codes] by a select tree over the 4 bits (Mosaic GPU has no gather)."""
    values = np.asarray(codebooks.code_table(quant_type), np.float32)
    level = [jnp.where((codes & 1) != 0, float(values[2 * i + 1]), float(values[2 * i])) for i in range(8)]
    for bit in (2, 4, 8):
        high = (codes & bit) != 0
        level = [jnp.where(high, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _kernel(
    layer_gmem,
    packed_gmem,
    scales_gmem,
    xe_gmem,
    xo_gmem,
    out_gmem,
    *,
    k,
    blocksize,
    config,
    quant_type,
    weight_dtype,
    x_dtype,
):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    tile, split = jax.lax.axis_index("n"), jax.lax.axis_index("k")
    layer = layer_gmem[0]
    rows = pl.ds(tile * ROWS, ROWS)
    steps = k // STEP // config.split_k
    half = STEP // 2
    # 16-bit operands in rows of 32 bytes: wgmma's (8, 16) tiles with a 32-byte swizzle, for A and B alike.
    mma_transforms = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))

    def step(_, packed_smem, scales_smem, xe_smem, xo_smem, *, acc_ref, hi_smem, lo_smem):
        codes = plgpu.load(packed_smem, layout=plgpu.Layout.WGMMA).astype(jnp.int32)  # [64, 32]
        scale = plgpu.load(scales_smem.at[0], layout=plgpu.Layout.WGMMA.reduce(1))  # [64]: this block's
        scale = plgpu.layout_cast(jax.lax.broadcast_in_dim(scale, (ROWS, half), (0,)), plgpu.Layout.WGMMA)
        for nibble, plane in ((codes >> 4, hi_smem), (codes & 0xF, lo_smem)):  # values 2j, 2j + 1
            w = _select_table(nibble, quant_type) * scale
            plane[...] = w.astype(weight_dtype).astype(x_dtype)  # bitsandbytes' rounding, then x's dtype
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, hi_smem, xe_smem)
        plgpu.wgmma(acc_ref, lo_smem, xo_smem)
        plgpu.wgmma_wait(0)

    def accumulate(hi_smem, lo_smem):
        def run(acc_ref):
            x_spec = plgpu.BlockSpec((half, TOKENS), lambda s: (split * steps + s, 0), transforms=mma_transforms)
            plgpu.emit_pipeline(
                functools.partial(step, acc_ref=acc_ref, hi_smem=hi_smem, lo_smem=lo_smem),
                grid=(steps,),
                in_specs=[
                    plgpu.BlockSpec((None, ROWS, half), lambda s: (layer, 0, split * steps + s)),
                    plgpu.BlockSpec((1, ROWS), lambda s: ((split * steps + s) * STEP // blocksize, 0)),
                    x_spec,
                    x_spec,
                ],
                max_concurrent_steps=config.max_concurrent_steps,
            )(packed_gmem.at[:, rows], scales_gmem.at[:, rows], xe_gmem, xo_gmem)
            return acc_ref[...]

        return pl.run_scoped(run, plgpu.ACC((ROWS, TOKENS), jnp.float32))

    def finish(hi_smem, lo_smem, out_smem):
        out_smem[...] = accumulate(hi_smem, lo_smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[split, rows])
        plgpu.wait_smem_to_gmem(0)

    out_transforms = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(64))
    plane = plgpu.SMEM((ROWS, half), x_dtype, transforms=mma_transforms)
    pl.run_scoped(finish, plane, plane, plgpu.SMEM((ROWS, TOKENS), jnp.float32, transforms=out_transforms))


def _scales_by_block(qt: QuantizedTensor) -> jax.Array:
    """float32[K / bs, N]: the absmax of each (block, row), `quant.decode_absmax`'s arithmetic computed in the
    order the kernel reads it (a block's scales for consecutive rows), so XLA writes it in one pass."""
    n, k = qt.shape
    blocks = k // qt.blocksize
    codes = jnp.asarray(qt.absmax).reshape(n, blocks).T  # [blocks, N]
    if not qt.double_quant:
        return codes.astype(jnp.float32)
    flat = jnp.arange(n)[None, :] * blocks + jnp.arange(blocks)[:, None]  # the block's index in the stored order
    nested = jnp.asarray(qt.nested_absmax, jnp.float32)[flat // qt.dq_blocksize]
    scaled = jnp.asarray(codebooks.DYNAMIC_CODE)[codes] * nested
    return round_before_add(scaled) + jnp.asarray(qt.offset, jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_mosaic(
    x: jax.Array,
    qt: QuantizedTensor,
    layer: jax.Array | None = None,
    *,
    config: MosaicDecodeConfig = MosaicDecodeConfig(),
    interpret: bool = False,
) -> jax.Array:
    """y[M, N] = x[M, K] @ dequantize(W).T for M <= 16 by the Mosaic GPU kernel, in x's dtype.

    qt and layer as for `decode.decode_pallas` (a stacked weight is read in place). interpret: run in Mosaic GPU's
    CPU interpreter (`InterpretGPUParams`). Raises ValueError for a weight or config it cannot take (see
    `MosaicDecodeConfig.check`), RuntimeError on jax < 0.11, TypeError for another x dtype.
    """
    if reason := mosaic_unavailable_reason():
        raise RuntimeError(reason)
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"the Mosaic decode kernel takes bfloat16 or float16 x (16-bit wgmma), got {x.dtype}")
    if (layer is None) != (np.ndim(qt.packed) == 1):
        raise ValueError(f"a stacked weight needs its layer index and an unstacked one none ({qt}, {layer=})")
    m, (n, k) = x.shape[0], qt.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got shape {x.shape}")
    config.check(m=m, n=n, k=k, blocksize=qt.blocksize)
    layers = 1 if layer is None else np.shape(qt.packed)[0]
    packed = jnp.asarray(qt.packed).reshape(layers, n, k // 2)
    scales = _scales_by_block(layer_of(qt, layer))  # [K/bs, N] float32: one XLA fusion
    xe, xo = (jnp.pad(a, ((0, TOKENS - m), (0, 0))).T for a in (x[:, 0::2], x[:, 1::2]))  # [K/2, 16] each
    layer_index = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    kernel = functools.partial(
        _kernel,
        k=k,
        blocksize=qt.blocksize,
        config=config,
        quant_type=qt.quant_type,
        weight_dtype=jnp.dtype(qt.dtype),
        x_dtype=x.dtype,
    )
    partial = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((config.split_k, n, TOKENS), jnp.float32),
        grid=(n // ROWS, config.split_k),
        grid_names=("n", "k"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(layer_index, packed, scales, xe, xo)
    return jnp.sum(partial, axis=0)[:, :m].T.astype(x.dtype)  # [M, N]; fused into the consumer by XLA
