"""Blockwise 4-bit quantization (NF4, FP4) with double quantization, in bitsandbytes' exact storage format.

A weight is flattened, cut into blocks of `blocksize` values, and each value is stored as a 4-bit index into a
16-entry code table scaled by its block's absolute maximum. With double quantization the float32 absmax values are
themselves stored as 8-bit codes of bitsandbytes' dynamic map, in blocks of `dq_blocksize`, after subtracting their
mean (the offset). NF4 with blocks of 64 and double quantization costs 4 + 8/64 + 32/(64*256) = 4.127 bits a value.

Everything here reproduces `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (>= 0.50, CPU) bit for
bit, with one documented exception: the offset is the float32 mean of the absmax as XLA sums it, while torch's sum
order depends on the CPU's vector width and thread count, so the two offsets can differ in the last bit (any
offset decodes exactly; the tests compare everything else byte for byte given the same offset).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import codebooks

__all__ = [
    "QuantConfig",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "decode_absmax",
    "unpack_codes",
    "QUANT_BUFFERS",
    "SUPPORTED_BLOCKSIZES",
    "SUPPORTED_DTYPES",
]

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The arrays of a 4-bit weight (QuantizedTensor's data fields), by the names bitsandbytes stores them under.
QUANT_BUFFERS = ("packed", "absmax", "nested_absmax", "offset")

# Where a skip_modules pattern may end: after a dot, or before one, or at the end of the name (transformers').
_MODULE_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
# bitsandbytes clamps an all-zero final partial block's absmax to this (a float32 subnormal) and stores it.
_TINY_ABSMAX = np.float32(1e-38)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How a model's linear weights are stored, with the meanings of transformers' `BitsAndBytesConfig`.

    Attributes:
      quant_type: "nf4", "fp4" or "int4" (`bnb_4bit_quant_type`).
      double_quant: quantize the absmax too (`bnb_4bit_use_double_quant`).
      blocksize, dq_blocksize: values a block, absmax values a block of the 8-bit step.
      skip_modules: linear layers kept in 16 bits (`llm_int8_skip_modules`; transformers keeps lm_head unquantized
        by default, and so do we), matched against each module's full per-layer name as transformers matches them
        (`skips`): "lm_head", "o_proj" or "model.layers.0.mlp" (layer 0's MLP only), or a regular expression.

    How the model computes is not storage: its compute dtype is the `dtype` of `DecoderLM` / `load_pretrained`,
    which exports write as `bnb_4bit_compute_dtype`.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dq_blocksize: int = 256
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.quant_type not in codebooks.QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {codebooks.QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {self.blocksize!r}")
        if self.dq_blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"dq_blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {self.dq_blocksize!r}")
        if isinstance(self.skip_modules, str):
            raise ValueError(f"skip_modules must be a list of module names, got the string {self.skip_modules!r}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        for pattern in self.skip_modules:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"skip_modules: {pattern!r} is not a module name or regular expression ({e})") from e

    def skips(self, module_name: str) -> bool:
        """Whether the linear layer named `module_name` (one layer's: "model.layers.3.mlp.down_proj") stays in 16
        bits. transformers' rule (`quantizers_utils.should_convert_module`, 5.x): a pattern matches the name as a
        regular expression from its start up to a module boundary ("model.layers.1" matches
        "model.layers.1.mlp.up_proj", not "model.layers.11..."), or is a suffix of it ("o_proj")."""
        return any(
            re.match(rf"(?:{pattern}){_MODULE_BOUNDARY}", module_name) or module_name.endswith(pattern)
            for pattern in self.skip_modules
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(QUANT_BUFFERS),
    meta_fields=["shape", "dtype", "quant_type", "blocksize", "dq_blocksize"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A 4-bit blockwise-quantized array, laid out exactly as bitsandbytes stores it.

    Attributes:
      packed: uint8[ceil(n / 2)], two codes a byte, the first value's code in the high nibble.
      absmax: float32[blocks], or with double quantization uint8[blocks] codes of the dynamic 8-bit map.
      nested_absmax: float32[ceil(blocks / dq_blocksize)] with double quantization, else None.
      offset: float32[] with double quantization (added back after decoding the absmax codes), else None.
      shape, dtype: the original array's shape and dtype (static).
      quant_type: "nf4", "fp4" or "int4"; blocksize: values a block; dq_blocksize: absmax values a block of the 8-bit
        step, or None without double quantization (all static).

    The arrays may carry extra leading axes (layers stacked for `jax.lax.scan`); `shape` describes one slice.
    """

    packed: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...]
    dtype: Any
    quant_type: str
    blocksize: int
    dq_blocksize: int | None

    @property
    def size(self) -> int:
        """Number of values in one (unstacked) tensor."""
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.size // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.dq_blocksize is not None

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers, measured from the arrays themselves (all stacked slices included)."""
        leaves = jax.tree_util.tree_leaves(self)
        return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))

    @property
    def bits_per_param(self) -> float:
        slices = math.prod(self.packed.shape) // ((self.size + 1) // 2)
        return 8.0 * self.nbytes / (self.size * slices)

    def __repr__(self) -> str:
        dq = f", dq_blocksize={self.dq_blocksize}" if self.double_quant else ""
        return (
            f"QuantizedTensor({self.quant_type}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"blocksize={self.blocksize}{dq}, {self.bits_per_param:.3f} bits/param)"
        )


def _check_arguments(w: Any, quant_type: str, blocksize: int, dq_blocksize: int | None) -> None:
    dtype = getattr(w, "dtype", None)
    if dtype is None or jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise TypeError(
            f"can only quantize float32, bfloat16 or float16 arrays, got dtype {dtype} "
            f"(shape {getattr(w, 'shape', '?')})"
        )
    if quant_type not in codebooks.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {codebooks.QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    if dq_blocksize is not None and dq_blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"dq_blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {dq_blocksize!r}")
    if math.prod(w.shape) == 0:
        raise ValueError(f"cannot quantize an empty array (shape {tuple(w.shape)})")


def _raise_if_not_finite(w: jax.Array) -> None:
    bad = ~jnp.isfinite(w)
    count = int(jnp.sum(bad))
    if count:
        index = np.unravel_index(int(jnp.argmax(bad.reshape(-1))), w.shape)
        raise ValueError(
            f"cannot quantize an array with NaN or Inf: {count} of {w.size} values are not finite "
            f"(the first at index {tuple(int(i) for i in index)} is {w[index]})"
        )


def _fail_if_not_finite(all_finite: np.ndarray) -> None:
    if not bool(all_finite):
        raise ValueError("cannot quantize an array with NaN or Inf values")


def quantize(
    w: jax.Array | np.ndarray,
    config: QuantConfig | None = None,
    *,
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    dq_blocksize: int | None = None,
) -> QuantizedTensor:
    """Quantizes `w` to 4 bits as `bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics,
    quant_type)` does.

    Args:
      w: float32, bfloat16 or float16 array of any non-empty shape. NaN or Inf raise a ValueError (also under
        jit, where the check runs as a host callback).
      config: the storage as a `QuantConfig` (its `skip_modules` concern models, not one array); or the fields
        one by one below, each defaulting to QuantConfig's (NF4, blocks of 64, double quantization, 256).
        Giving both raises a TypeError.
      quant_type: "nf4" (NormalFloat, for normally distributed weights), "fp4", or "int4" (plain symmetric
        absmax rounding, a baseline that bitsandbytes cannot read).
      blocksize: values sharing one absmax, one of SUPPORTED_BLOCKSIZES.
      double_quant: store the absmax values as 8-bit codes too (bitsandbytes' `compress_statistics`).
      dq_blocksize: absmax values sharing one float32 scale in the 8-bit step (bitsandbytes uses 256).

    >>> qt = quantize(jnp.ones((1024, 1024)))
    >>> round(qt.bits_per_param, 3)  # 4 + 8/64 + 32/(64 * 256), plus the offset's 32 bits
    4.127
    >>> quantize(jnp.ones((1024, 1024)), QuantConfig(blocksize=128, double_quant=False)).absmax.dtype
    dtype('float32')
    """
    fields = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dq_blocksize=dq_blocksize)
    given = {name: value for name, value in fields.items() if value is not None}
    if config is not None and given:
        raise TypeError(f"quantize: give a QuantConfig or its fields ({', '.join(given)}), not both")
    c = config if config is not None else QuantConfig(**given)
    quant_type, blocksize, double_quant, dq_blocksize = c.quant_type, c.blocksize, c.double_quant, c.dq_blocksize
    if not hasattr(w, "dtype"):
        w = np.asarray(w)
    _check_arguments(w, quant_type, blocksize, dq_blocksize if double_quant else None)
    traced = isinstance(w, jax.core.Tracer)
    if not traced:
        w = jnp.asarray(w)
        _raise_if_not_finite(w)
    return _quantize(
        w,
        quant_type=quant_type,
        blocksize=blocksize,
        dq_blocksize=dq_blocksize if double_quant else None,
        check_in_graph=traced,
    )


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "dq_blocksize", "check_in_graph"))
def _quantize(w, *, quant_type, blocksize, dq_blocksize, check_in_graph) -> QuantizedTensor:
    if check_in_graph:
        jax.debug.callback(_fail_if_not_finite, jnp.all(jnp.isfinite(w)))
    codes, absmax = _quantize_4bit(w.reshape(-1).astype(jnp.float32), blocksize, quant_type)
    packed = _pack_nibbles(codes)
    nested_absmax = offset = None
    if dq_blocksize is not None:
        offset = _mean_correctly_rounded(absmax)
        absmax, nested_absmax = _quantize_dynamic_8bit(absmax - offset, dq_blocksize)
    return QuantizedTensor(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype),
        quant_type=quant_type,
        blocksize=blocksize,
        dq_blocksize=dq_blocksize,
    )


def _quantize_4bit(x: jax.Array, blocksize: int, quant_type: str) -> tuple[jax.Array, jax.Array]:
    """float32[n] -> (uint8 codes[n rounded up to even], float32 absmax[blocks])."""
    n = x.shape[0]
    full_blocks, rem = divmod(n, blocksize)
    scaled, absmax = [], []
    if full_blocks:
        blocks = x[: full_blocks * blocksize].reshape(full_blocks, blocksize)  # [B, bs]
        block_max = jnp.max(jnp.abs(blocks), axis=1)
        # bitsandbytes multiplies by 1 / max(absmax, 1e-38); XLA flushes that subnormal to zero, so an all-zero
        # block (where bitsandbytes gets 0 * 1e38 = 0) is handled by the select instead.
        inverse = jnp.where(block_max > 0, 1.0 / block_max, 0.0)
        scaled.append(jnp.clip(blocks * inverse[:, None], -1.0, 1.0).reshape(-1))
        absmax.append(block_max)
    if rem:
        # The last partial block is divided by its absmax (a true division, unlike the full blocks).
        tail = x[full_blocks * blocksize :]
        tail_max = jnp.max(jnp.abs(tail))
        scaled.append(jnp.where(tail_max > 0, jnp.clip(tail / tail_max, -1.0, 1.0), 0.0))
        absmax.append(jnp.where(tail_max > 0, tail_max, _TINY_ABSMAX)[None])
    scaled = jnp.concatenate(scaled) if len(scaled) > 1 else scaled[0]
    if n % 2:
        scaled = jnp.pad(scaled, (0, 1))  # the pad value is quantized like any 0.0
    midpoints, order = codebooks.bucket_bounds(quant_type)
    bucket = jnp.sum(scaled[:, None] > jnp.asarray(midpoints), axis=-1).astype(jnp.uint8)
    codes = jnp.asarray(order)[bucket] if quant_type == "fp4" else bucket
    return codes, jnp.concatenate(absmax) if len(absmax) > 1 else absmax[0]


def _pack_nibbles(codes: jax.Array) -> jax.Array:
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_codes(packed: jax.Array) -> jax.Array:
    """uint8[m] packed bytes -> uint8[2m] 4-bit codes, in storage order."""
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)


def _quantize_dynamic_8bit(x: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """Blockwise 8-bit quantization with the dynamic map, as bitsandbytes' CPU kernel does it.

    float32[n] -> (uint8 codes[n], float32 absmax[ceil(n / blocksize)]). Each value is scaled by the reciprocal of
    its block's absmax, mapped to one of 65536 evenly spaced points in [-1, 1] and looked up in a table.
    """
    n = x.shape[0]
    num_blocks = -(-n // blocksize)
    blocks = jnp.pad(x, (0, num_blocks * blocksize - n)).reshape(num_blocks, blocksize)
    block_max = jnp.max(jnp.abs(blocks), axis=1)
    inverse = jnp.where(block_max > 0, 1.0 / block_max, 0.0)
    normalized = jnp.clip(blocks * inverse[:, None], -1.0, 1.0)
    lut_index = jnp.floor(((normalized + 1.0) * 0.5) * 65535.0 + 0.5).astype(jnp.int32)
    codes = jnp.asarray(codebooks.dynamic_lookup_table())[lut_index]
    codes = jnp.where(block_max[:, None] > 0, codes, jnp.uint8(0))  # bitsandbytes writes 0 for a zero block
    return codes.reshape(-1)[:n], block_max


def round_before_add(x: jax.Array) -> jax.Array:
    """Returns x, rounded to float32 before any later addition.

    XLA contracts `a * b + c` into a fused multiply-add (one rounding) on CPU and GPU; bitsandbytes rounds the
    product first. A select between the two blocks the contraction without changing any value.
    """
    return jnp.where(x == x, x, jnp.nan)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a + b = s + err exactly (Knuth's TwoSum; XLA does not reassociate float adds)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _split_high(x: jax.Array) -> jax.Array:
    """x with the low 12 of its 23 mantissa bits cleared, so x = high + (x - high) exactly, each with <= 12 bits."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _mean_correctly_rounded(x: jax.Array) -> jax.Array:
    """The float32 nearest to the exact mean of float32[n] x (barring exact ties), on any device.

    Double quantization subtracts this mean; computing it exactly makes the result independent of the summation
    order of whichever device quantizes (torch's own mean is within an ulp or two of this one).
    """
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    s, err = jnp.pad(x, (0, size - n)), jnp.zeros(size, jnp.float32)
    while s.shape[0] > 1:  # pairwise TwoSum: the sum in s, the rounding errors (tiny) summed alongside in err
        pairs, err_pairs = s.reshape(-1, 2), err.reshape(-1, 2)
        s, e = _two_sum(pairs[:, 0], pairs[:, 1])
        err = e + (err_pairs[:, 0] + err_pairs[:, 1])
    total_hi, total_lo = s[0], err[0]  # exact sum ~= total_hi + total_lo
    quotient = (total_hi + total_lo) / jnp.float32(n)
    # remainder = sum - quotient * n, with quotient * n formed from four exact 12-bit x 12-bit products
    q_hi, n_f = _split_high(quotient), jnp.float32(n)
    n_hi = _split_high(n_f)
    q_lo, n_lo = quotient - q_hi, n_f - n_hi
    remainder = (
        (total_hi - round_before_add(q_hi * n_hi)) - round_before_add(q_hi * n_lo) - round_before_add(q_lo * n_hi)
    )
    remainder = remainder - round_before_add(q_lo * n_lo) + total_lo
    ulp = jnp.nextafter(quotient, jnp.float32(jnp.inf)) - quotient
    half_step = round_before_add(ulp * n_f) * 0.5  # rounding the quotient up or down moves the remainder by ulp * n
    up, down = remainder > half_step, remainder < -half_step
    quotient = jnp.where(up, jnp.nextafter(quotient, jnp.float32(jnp.inf)), quotient)
    return jnp.where(down, jnp.nextafter(quotient, jnp.float32(-jnp.inf)), quotient)


def decode_absmax(qt: QuantizedTensor) -> jax.Array:
    """float32[blocks] absmax of each 4-bit block, decoding the 8-bit codes if double-quantized."""
    if not qt.double_quant:
        return qt.absmax.astype(jnp.float32)
    codes = qt.absmax
    num_blocks = codes.shape[-1]
    nested_index = jnp.arange(num_blocks) // qt.dq_blocksize
    scaled = jnp.asarray(codebooks.DYNAMIC_CODE)[codes] * qt.nested_absmax[..., nested_index]
    return round_before_add(scaled) + jnp.asarray(qt.offset, jnp.float32)[..., None]


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(qt: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """The array `qt` encodes, in `dtype` (default: the original dtype), as `bitsandbytes.dequantize_4bit`."""
    dtype = jnp.dtype(qt.dtype if dtype is None else dtype)
    n, bs = qt.size, qt.blocksize
    padded = qt.num_blocks * bs
    codes = unpack_codes(qt.packed)  # 2 * ceil(n / 2) <= padded codes
    codes = jnp.pad(codes, (0, padded - codes.shape[0]))
    values = jnp.asarray(codebooks.code_table(qt.quant_type))[codes].reshape(-1, bs)  # [blocks, bs]
    values = values * decode_absmax(qt)[:, None]
    return values.reshape(-1)[:n].astype(dtype).reshape(qt.shape)
