"""The code tables of bitsandbytes' 4-bit and 8-bit blockwise formats, bit for bit.

Every table here equals what bitsandbytes (>= 0.50) builds, as float32; `tests/test_quant_bnb.py` checks each
one against the installed package.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NF4_CODE", "FP4_CODE", "INT4_CODE", "DYNAMIC_CODE", "code_table", "QUANT_TYPES", "BNB_QUANT_TYPES"]

BNB_QUANT_TYPES = ("nf4", "fp4")  # what bitsandbytes (and so transformers, PEFT, vLLM) can read
QUANT_TYPES = (*BNB_QUANT_TYPES, "int4")

# NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, appendix E), as bitsandbytes hardcodes them.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, normalised by its largest magnitude.
# Index 8 (sign bit with a zero magnitude) is +0.0 in bitsandbytes, not -0.0.
FP4_CODE = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32) / np.float32(
    12.0
)

# Plain symmetric absmax INT4, round(7 * x / absmax): a baseline to compare NF4 against (not a bitsandbytes
# format). Its 16th code repeats 1.0 and is never chosen.
INT4_CODE = np.append(np.arange(-7, 8, dtype=np.float32) / np.float32(7.0), np.float32(1.0))

# bitsandbytes buckets into the *sorted* table and maps the bucket back through this argsort (torch's choice
# among the two zeros included), so a value that rounds to zero from above gets code 8, from below code 0.
_FP4_SORT_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: fused multiply-add from both ends."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    from_start = (np.float64(start32) + np.float64(step) * i).astype(np.float32)
    from_end = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, from_start, from_end).astype(np.float32)


def _dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`), used for double quantization."""
    data: list[float] = []
    for i in range(max_exponent_bits):
        bounds = _torch_linspace_f32(0.1, 1.0, 2 ** (i + total_bits - 1 - max_exponent_bits) + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2.0)).astype(np.float32)
        level = (np.float32(10.0 ** (-(max_exponent_bits - 1) + i)) * means).astype(np.float32)
        data += level.tolist() + (-level).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2**total_bits
    return np.sort(np.array(data, dtype=np.float32))


DYNAMIC_CODE = _dynamic_map()


def code_table(quant_type: str) -> np.ndarray:
    """The 16 float32 values a 4-bit code decodes to (times its block's absmax)."""
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    if quant_type == "int4":
        return INT4_CODE
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def bucket_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between neighbouring sorted code values, and the map from bucket index to code.

    Quantizing is `code = order[#(midpoints < x)]`, which is `torch.bucketize(x, midpoints)` remapped, the way
    bitsandbytes does it on CPU.
    """
    code = code_table(quant_type)
    order = _FP4_SORT_ORDER if quant_type == "fp4" else np.arange(16, dtype=np.uint8)  # the others are sorted
    ordered = code[order]
    midpoints = ((ordered[:-1] + ordered[1:]) / np.float32(2.0)).astype(np.float32)
    return midpoints, order


def dynamic_lookup_table() -> np.ndarray:
    """The 65536-entry table bitsandbytes' CPU 8-bit quantizer indexes instead of searching the dynamic map.

    Entry i covers the normalised value -1 + 2i/65535 and holds the first code whose upper midpoint is not
    below it. It is *not* the exact nearest code for values that fall between two entries: to be byte-exact
    with bitsandbytes we use the table too.
    """
    midpoints = (np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])).astype(np.float32)
    i = np.arange(65536, dtype=np.float32)
    value = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535.0)).astype(np.float32)
    return np.searchsorted(midpoints, value, side="left").astype(np.uint8)
