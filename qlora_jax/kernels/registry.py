"""The kernels `nf4_matmul` can run, in one table: name, op, config type, candidate space, default, reference.

Dispatch, the tuner, the shipped tables and the CLI find a kernel here, by name or by (op, config type), instead
of testing types where they use one. A kernel's candidate space is what `qlora-jax tune` times for a shape; only
kernels marked `in_auto` enter it, so a kernel nobody has measured can be selected by name (`KernelOptions`,
`config=`) but is never chosen by `impl="auto"`.

The decode kernel's candidates are chosen from what the deviceless compile for sm_90 reports (registers, spills,
shared memory, pipelined loads; docs/kernels.md has the figures): every candidate compiles without spilling, its
loads are pipelined (the tensor-core variant through shared memory, the CUDA-core variant by register prefetch),
and the tensor-core variant is a candidate at every M.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qlora_jax.kernels import dequant, matmul
from qlora_jax.kernels.decode import FMA_MAX_M, MAX_M, DecodeConfig, decode_pallas, decode_reference
from qlora_jax.kernels.decode_mosaic import (
    MosaicDecodeConfig,
    decode_mosaic,
    mosaic_unavailable_reason,
    mosaic_unsupported_reason,
)

__all__ = ["Kernel", "KERNELS", "OPS", "by_name", "kernel_for", "config_name", "config_from_name", "candidates"]

OPS = ("forward", "backward", "dequantize")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas kernel.

    Attributes:
      name: its registry name (also how a tuning entry names its config's kernel).
      op: "forward" (y = x @ W.T), "backward" (dx = dy @ W) or "dequantize".
      config_type: its frozen tile/launch dataclass.
      call: call(activations, qt, *, config, interpret) -> output (`dequantize`: call(qt, dtype, ...)).
      reference: the plain-JAX computation it is tested against.
      space: space(m, n, k, blocksize) -> the configs worth timing for a shape (all valid for it).
      default: default(m, n, k, blocksize, cores) -> the config used when nothing was measured.
      max_rows: max_rows(config) -> rows of activations one launch takes (None: any).
      decode: a decode kernel (M <= 16, reads a stacked weight in place): `KernelOptions.decode_kernel` names one.
      in_auto: whether `impl="auto"` and the tuner may choose it (only once measured on a GPU).
      unavailable: unavailable() -> why it cannot run with this jax (None when it can).
      unsupported: unsupported(qt) -> why it cannot take this weight (one layer of it), or None.
    """

    name: str
    op: str
    config_type: type
    call: Callable[..., Any]
    reference: Callable[..., Any]
    space: Callable[[int, int, int, int], list[Any]]
    default: Callable[[int, int, int, int, int], Any]
    max_rows: Callable[[Any], int | None] = lambda config: None
    decode: bool = False
    in_auto: bool = True
    unavailable: Callable[[], str | None] = lambda: None
    unsupported: Callable[[Any], str | None] = lambda qt: None


def _block_k(k: int, blocksize: int) -> int:
    return 64 if blocksize % 64 == 0 and k % 64 == 0 else 32


# (block_n, block_k, split_k, num_warps): the decode tiles that compile for sm_90 without spilling (docs/kernels.md)
DECODE_MMA_TILES = (
    (64, 128, 4, 4),
    (32, 128, 4, 4),
    (64, 256, 2, 4),
    (128, 128, 2, 4),
    (32, 256, 1, 4),
    (64, 128, 1, 4),
)
DECODE_FMA_TILES = ((32, 128, 4, 4), (64, 128, 4, 8), (16, 128, 2, 4), (16, 256, 1, 4))


def _fit(k: int, block_k: int, split: int) -> int:
    while split > 1 and k % (block_k * split):
        split //= 2
    return split


def decode_space(m: int, n: int, k: int, blocksize: int) -> list[DecodeConfig]:
    """The decode kernel's candidates at M <= 16: tensor-core tiles at every M (code lookup by select tree:
    a gather from the table is staged through shared memory element by element there), CUDA-core tiles for
    M <= 4; K split to keep every SM streaming, 1 where the output is written directly."""
    del n
    if m > MAX_M:
        return []
    configs = []
    for bn, bk, split, warps in DECODE_MMA_TILES:
        if k % bk == 0:
            configs.append(
                DecodeConfig(
                    block_n=bn, block_k=bk, split_k=_fit(k, bk, split), dot="mma", lookup="select", num_warps=warps
                )
            )
    if m <= FMA_MAX_M:
        for bn, bk, split, warps in DECODE_FMA_TILES:
            if k % bk == 0:
                configs.append(
                    DecodeConfig(
                        block_n=bn, block_k=bk, split_k=_fit(k, bk, split), dot="fma", lookup="gather", num_warps=warps
                    )
                )
    return [c for c in dict.fromkeys(configs) if k % (c.block_k * c.split_k) == 0 and k % blocksize == 0]


def decode_default(m: int, n: int, k: int, blocksize: int, cores: int) -> DecodeConfig:
    """Tensor cores (a select tree for the code lookup), 256 values a row and step, no split of K (y written
    directly in x's dtype: no partial sums to add afterwards), and tiles of rows as wide as still give every SM a
    program (16 at least)."""
    del m, blocksize
    block_n = next((bn for bn in (64, 32) if -(-n // bn) >= cores), 16)
    block_k = next(bk for bk in (256, 128, 64) if k % bk == 0)
    return DecodeConfig(block_n=block_n, block_k=block_k, split_k=1, dot="mma", lookup="select")


def _matmul_forward_space(m: int, n: int, k: int, blocksize: int) -> list[matmul.MatmulConfig]:
    del n
    block_ks = [bk for bk in (64, 32, 128) if blocksize % bk == 0 and k % bk == 0]
    if m <= MAX_M:
        bk = block_ks[0]
        return [
            matmul.MatmulConfig(block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=4)
            for bn, split in ((128, 4), (64, 8), (128, 2), (64, 4))
            if k % (bk * split) == 0
        ]
    return [
        matmul.MatmulConfig(block_m=bm, block_n=bn, block_k=kk, num_warps=w, num_stages=st)
        for bm, bn, w in ((128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4))
        for kk in block_ks[:2]
        for st in (3, 4)
    ]


def _matmul_backward_space(m: int, n: int, k: int, blocksize: int) -> list[matmul.MatmulConfig]:
    del n
    block_ks = [bk for bk in (64, 32, 128) if blocksize % bk == 0 and k % bk == 0]
    bms = (16, 64) if m <= MAX_M else (64, 128)
    return [
        matmul.MatmulConfig(block_m=bm, block_n=bn, block_k=kk, num_warps=w, num_stages=3)
        for bm in bms
        for bn in (32, 64)
        for kk in block_ks[:2]
        for w in (4, 8)
    ]


def _matmul_default(m: int, n: int, k: int, blocksize: int, cores: int) -> matmul.MatmulConfig:
    del m, n, cores
    return matmul.MatmulConfig(block_m=64, block_n=64, block_k=_block_k(k, blocksize))


DEQUANT_SPACE = (
    dequant.DequantConfig(block_rows=32, block_cols=64),
    dequant.DequantConfig(block_rows=64, block_cols=64, num_warps=8),
    dequant.DequantConfig(block_rows=16, block_cols=128),
)

KERNELS = (
    Kernel(
        name="decode",
        op="forward",
        config_type=DecodeConfig,
        call=decode_pallas,
        reference=decode_reference,
        space=decode_space,
        default=decode_default,
        max_rows=lambda config: FMA_MAX_M if config.dot == "fma" else MAX_M,
        decode=True,
    ),
    Kernel(
        name="decode_mosaic",
        op="forward",
        config_type=MosaicDecodeConfig,
        call=decode_mosaic,
        reference=decode_reference,
        space=lambda m, n, k, blocksize: [],  # not timed by the tuner until measured on a GPU
        default=lambda m, n, k, blocksize, cores: MosaicDecodeConfig(),
        max_rows=lambda config: MAX_M,
        decode=True,
        in_auto=False,
        unavailable=mosaic_unavailable_reason,
        unsupported=mosaic_unsupported_reason,
    ),
    Kernel(
        name="matmul",
        op="forward",
        config_type=matmul.MatmulConfig,
        call=matmul.matmul_pallas,
        reference=matmul.matmul_reference,
        space=_matmul_forward_space,
        default=_matmul_default,
    ),
    Kernel(
        name="matmul_transposed",
        op="backward",
        config_type=matmul.MatmulConfig,
        call=matmul.matmul_transposed_pallas,
        reference=matmul.matmul_transposed_reference,
        space=_matmul_backward_space,
        default=_matmul_default,
    ),
    Kernel(
        name="dequantize",
        op="dequantize",
        config_type=dequant.DequantConfig,
        call=dequant.dequantize_pallas,
        reference=dequant.dequantize_reference,
        space=lambda m, n, k, blocksize: list(DEQUANT_SPACE),
        default=lambda m, n, k, blocksize, cores: dequant.DequantConfig(),
    ),
)


def by_name(name: str) -> Kernel:
    """The kernel registered under `name`. Raises ValueError naming the choices."""
    for kernel in KERNELS:
        if kernel.name == name:
            return kernel
    raise ValueError(f"unknown kernel {name!r}; registered: {[k.name for k in KERNELS]}")


def kernel_for(op: str, config: Any) -> Kernel:
    """The kernel of `op` that takes this config. Raises ValueError when none does."""
    for kernel in KERNELS:
        if kernel.op == op and type(config) is kernel.config_type:
            return kernel
    raise ValueError(f"no {op} kernel takes a {type(config).__name__}")


def config_name(config: Any) -> str:
    """The name a tuning entry records for a config: its forward kernel's ("decode", "matmul")."""
    for kernel in KERNELS:
        if type(config) is kernel.config_type:
            return kernel.name
    raise ValueError(f"not a kernel config: {config!r}")


def config_from_name(name: str, fields: dict[str, Any]) -> Any:
    """The config of kernel `name` with these fields (a tuning entry's). Raises ValueError for an unknown name,
    TypeError for unknown fields."""
    return by_name(name).config_type(**fields)


def candidates(op: str, m: int, n: int, k: int, blocksize: int) -> list[Any]:
    """The configs of every `in_auto` kernel of `op` worth timing for this shape, in registry order."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    out = []
    for kernel in KERNELS:
        if kernel.op == op and kernel.in_auto and kernel.unavailable() is None:
            out += kernel.space(m, n, k, blocksize)
    return list(dict.fromkeys(out))
