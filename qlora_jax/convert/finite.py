"""The check that no NaN or Inf weight is read or written: every reader of weights and every writer of a model
calls `non_finite` on each floating-point tensor and raises its own error, naming the file and the tensor."""

from __future__ import annotations

import numpy as np

__all__ = ["non_finite"]


def non_finite(array: np.ndarray) -> str | None:
    """None if every value of `array` is finite (integer arrays always are), else what is wrong, e.g.
    "holds 3 NaN and 1 Inf of its 4096 values"."""
    array = np.asarray(array)
    if not (
        np.issubdtype(array.dtype, np.floating) or array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
    ):
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = array.size - int(np.count_nonzero(finite)) - nan
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"holds {' and '.join(parts)} of its {array.size} values"
