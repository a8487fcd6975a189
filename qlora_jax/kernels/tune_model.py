"""`qlora-jax tune CONFIG.yaml`: measure the kernel choices for the 4-bit linear shapes of a configured model.

The model is read from its config alone (no weights); each distinct (out_features, in_features) of its quantized
linear layers (`qlora_jax.nn.linear_shapes`) is tuned for the decode M buckets (forward: generation, M = batch
<= 16) and for the training micro-batch's M (forward and backward), and the winners are written to the tuning
cache that `impl="auto"` reads. Each key tunes in at most ~20 s (`autotune.TUNE_BUDGET_S`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.kernels import autotune
from qlora_jax.kernels.decode import MAX_M
from qlora_jax.quant import QuantizedTensor, quantize

__all__ = ["LinearShape", "tune_shapes", "DECODE_MS"]

DECODE_MS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """One distinct 4-bit weight of a model: its shape (out_features, in_features), storage and compute dtypes."""

    out_features: int
    in_features: int
    weight_dtype: str
    compute_dtype: str
    quant_type: str
    blocksize: int
    double_quant: bool
    modules: tuple[str, ...]  # which layers have it (module names, e.g. "self_attn.q_proj")

    def abstract_weight(self) -> QuantizedTensor:
        return jax.eval_shape(
            lambda: quantize(
                jnp.zeros((self.out_features, self.in_features), self.weight_dtype),
                quant_type=self.quant_type,
                blocksize=self.blocksize,
                double_quant=self.double_quant,
            )
        )


def tune_shapes(
    shapes: Sequence[LinearShape],
    *,
    decode_ms: Sequence[int] = DECODE_MS,
    train_m: int | None = None,
    cache: autotune.TuningCache,
    force: bool = False,
    measure: Callable[..., autotune.Choice] | None = None,
    report: Callable[[str], Any] = print,
) -> list[tuple[autotune.TuningKey, autotune.Choice]]:
    """Tunes forward at each decode M (<= 16) and forward + backward at `train_m`, for each shape; keys already in
    the cache are kept unless `force`. Returns the (key, choice) pairs, in order."""
    from qlora_jax.kernels import dispatch

    measure = measure or dispatch.measure
    jobs = [("forward", m) for m in sorted({autotune.m_bucket(m) for m in decode_ms if 1 <= m <= MAX_M})]
    if train_m:
        jobs += [("forward", train_m), ("backward", train_m)]
    results = []
    for shape in shapes:
        qt = shape.abstract_weight()
        for op, m in jobs:
            key = dispatch.tuning_key(op, m, qt, shape.compute_dtype)
            if not force and (cached := cache.get(key)) is not None:
                report(f"{_describe(key, shape)}: cached ({_summary(cached)})")
                results.append((key, cached))
                continue
            start = time.monotonic()
            choice = measure(op, m, qt, jnp.dtype(shape.compute_dtype), cache=cache)
            report(f"{_describe(key, shape)}: {_summary(choice)} [{time.monotonic() - start:.1f} s]")
            results.append((key, choice))
    return results


def _describe(key: autotune.TuningKey, shape: LinearShape) -> str:
    return f"{key.op:8s} M<={key.m_bucket:<5d} {key.n}x{key.k} ({', '.join(shape.modules)})"


def _summary(choice: autotune.Choice) -> str:
    xla = f"xla {choice.xla_time_s * 1e6:.1f} us" if choice.xla_time_s else "xla"
    if choice.impl == "pallas":
        return f"fused {choice.time_s * 1e6:.1f} us vs {xla}: {choice.config}"
    fused = f"; best fused {choice.fused_time_s * 1e6:.1f} us" if choice.fused_time_s else ""
    return f"{xla}{fused}: XLA kept"
