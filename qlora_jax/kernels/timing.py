"""Timing a kernel fairly: many calls inside one jit, each on a distinct weight, so that neither dispatch overhead
nor the L2 cache (50-60 MB on an H100/H200) flatters anyone. Used by the tuner and by `benchmarks/gpu.py`."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.quant import QuantizedTensor, quantize

__all__ = ["copies_for", "distinct_weights", "per_call_seconds"]

TARGET_BYTES = 256 * 2**20  # the weights one timed jit walks through: several times any L2


def copies_for(bytes_per_weight: int, *, target: int = TARGET_BYTES, low: int = 2, high: int = 32) -> int:
    """How many distinct weights to cycle through so that together they are `target` bytes, within [low, high]."""
    return max(low, min(high, -(-target // max(bytes_per_weight, 1))))


def distinct_weights(
    n: int,
    k: int,
    dtype: Any,
    count: int,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    seed: int = 0,
    dense: bool = False,
) -> QuantizedTensor | jax.Array:
    """`count` different random N(0, 0.02) weights [N, K] stacked on a leading axis: a QuantizedTensor whose buffers
    carry the axis (or, with `dense`, the dense array [count, N, K] in `dtype`). Made on the default device."""
    return _maker(n, k, jnp.dtype(dtype), count, quant_type, blocksize, double_quant, dense)(jax.random.key(seed))


@functools.cache
def _maker(n, k, dtype, count, quant_type, blocksize, double_quant, dense):
    """One jitted generator per shape and layout (a tuner or benchmark calls it many times)."""

    @jax.jit
    def make(key):
        w = (jax.random.normal(key, (count, n, k), jnp.float32) * 0.02).astype(dtype)
        if dense:
            return w
        return jax.vmap(lambda a: quantize(a, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant))(w)

    return make


def unstack(stacked: Any, count: int) -> list[Any]:
    """The `count` slices of a pytree stacked on its leading axis, as separate buffers."""
    return [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(count)]


def per_call_seconds(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    weights: Any,
    count: int,
    *,
    mode: str = "unrolled",
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per call of fn(*args, weight) over `count` distinct weights (stacked on their leading axis).

    mode "unrolled": the calls are written out one after another inside one jit, each weight a separate buffer
    (the kernel alone); "scan": one `lax.scan` over the stacked weights (what a model's scan over layers runs: XLA
    slices each layer's weight out of the stack). Every output is summed so that nothing is optimized away (a
    cost common to all candidates). Returns the best of `repeats` timed runs (after a compile-and-warm-up run)
    divided by `count`. Raises ValueError when the stack holds fewer than `count` weights (a call would read a
    weight another call left in L2).
    """
    available = jax.tree.leaves(weights)[0].shape[0]
    if count > available:
        raise ValueError(f"count={count} calls need as many distinct weights; the stack holds {available}")

    def total(out):
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))

    if mode == "unrolled":
        slices = unstack(weights, count)

        @jax.jit
        def run(args, slices):
            return sum(total(fn(*args, w)) for w in slices)

        call = lambda: run(args, slices)  # noqa: E731
    elif mode == "scan":

        @jax.jit
        def run(args, stacked):
            return jax.lax.scan(lambda c, w: (c + total(fn(*args, w)), None), jnp.float32(0), stacked)[0]

        call = lambda: run(args, weights)  # noqa: E731
    else:
        raise ValueError(f"mode must be 'unrolled' or 'scan', got {mode!r}")
    jax.block_until_ready(call())
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = clock()
        jax.block_until_ready(call())
        best = min(best, clock() - start)
    return best / count
