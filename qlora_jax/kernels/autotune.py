"""Choosing kernels and tile sizes by timing them on the GPU, with a persistent cache.

A choice is keyed by (op, GPU kind, M bucket, N, K, dtype, quant type, blocksize, double quant). For each key we
time the plain XLA path (dequantize, then cuBLAS) and every fused configuration in the tuning space, and keep the
fastest, so `impl="auto"` is never slower than XLA on a measured shape. Without a measurement (no GPU, tuning off)
a conservative default applies: fused for small M, where reading 4-bit weights wins, XLA otherwise.

The cache is a JSON file (default `~/.cache/qlora_jax/autotune.json`, or `$QLORA_JAX_AUTOTUNE_CACHE`), written
atomically.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels.dequant import DequantConfig
from qlora_jax.kernels.matmul import MatmulConfig

__all__ = [
    "Choice",
    "TuningKey",
    "TuningCache",
    "m_bucket",
    "tuning_space",
    "default_choice",
    "tune",
    "cache_path",
]

log = logging.getLogger(__name__)

OPS = ("forward", "backward")
SMALL_M = 32  # at or below: decode-style configs (block_m=16, split-K)
_WARPS_STAGES_SMALL = ((2, 3), (4, 4))
_WARPS_STAGES_LARGE = ((4, 3), (8, 3), (4, 4))


def m_bucket(m: int) -> int:
    """M rounded up to a power of two, capped at 16384: shapes in one bucket share a choice."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)


@dataclasses.dataclass(frozen=True)
class TuningKey:
    op: str
    device_kind: str
    m_bucket: int
    n: int
    k: int
    dtype: str
    quant_type: str
    blocksize: int
    double_quant: bool

    def __str__(self) -> str:
        return "|".join(str(v) for v in dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class Choice:
    """The winner, impl "pallas" (with `config`) or "xla"; also the best fused config even when XLA won (what
    impl="pallas" uses). `source` says whether it was measured or defaulted."""

    impl: str
    config: MatmulConfig | None = None
    source: str = "default"
    time_s: float | None = None
    xla_time_s: float | None = None
    fused_config: MatmulConfig | None = None
    fused_time_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("config", "fused_config"):
            value = getattr(self, name)
            out[name] = dataclasses.asdict(value) if value else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Choice:
        data = dict(data)
        for name in ("config", "fused_config"):
            data[name] = MatmulConfig(**data[name]) if data.get(name) else None
        return cls(**data)


def tuning_space(op: str, m: int, n: int, k: int, blocksize: int) -> list[MatmulConfig]:
    """Every fused configuration worth timing for this shape (all valid for it)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    block_ks = [bk for bk in (32, 64, 128) if blocksize % bk == 0 and k % bk == 0]
    configs: Iterable[MatmulConfig]
    if op == "forward" and m <= SMALL_M:
        configs = (
            MatmulConfig(block_m=16, block_n=bn, block_k=bk, split_k=s, num_warps=w, num_stages=st)
            for bn, bk, s, (w, st) in itertools.product((32, 64, 128), block_ks, (1, 2, 4, 8), _WARPS_STAGES_SMALL)
            if k % (bk * s) == 0
        )
    elif op == "forward":
        configs = (
            MatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            for bm, bn, bk, (w, st) in itertools.product((64, 128), (64, 128), block_ks, _WARPS_STAGES_LARGE)
        )
    else:
        configs = (
            MatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            for bm, bn, bk, (w, st) in itertools.product((16, 64, 128), (32, 64), block_ks, _WARPS_STAGES_LARGE[:2])
            if bm > 16 or m <= SMALL_M
        )
    return list(configs)


DEQUANT_SPACE = (
    DequantConfig(block_rows=32, block_cols=64),
    DequantConfig(block_rows=64, block_cols=64, num_warps=8),
    DequantConfig(block_rows=16, block_cols=128),
)


def default_choice(op: str, m: int, n: int, k: int, blocksize: int, num_cores: int = 132) -> Choice:
    """The untuned choice: fused for small-M forward (memory-bound; 4-bit reads win), XLA otherwise."""
    block_k = 64 if blocksize % 64 == 0 and k % 64 == 0 else 32
    if op == "backward":
        return Choice("xla", fused_config=MatmulConfig(block_m=64, block_n=64, block_k=block_k))
    if m > SMALL_M:
        return Choice("xla", fused_config=MatmulConfig(block_m=64, block_n=64, block_k=block_k))
    n_tiles = -(-n // 64)
    split = 1
    while split < 8 and n_tiles * split < 2 * num_cores and k % (block_k * split * 2) == 0:
        split *= 2  # enough programs to keep every SM streaming the weight
    config = MatmulConfig(block_m=16, block_n=64, block_k=block_k, split_k=split, num_warps=4, num_stages=3)
    return Choice("pallas", config, fused_config=config)


def cache_path() -> Path:
    if env := os.environ.get("QLORA_JAX_AUTOTUNE_CACHE"):
        return Path(env)
    return Path.home() / ".cache" / "qlora_jax" / "autotune.json"


class TuningCache:
    """The persistent map from TuningKey to Choice; a corrupt file is reported and ignored, never overwritten
    silently with less than it held (entries are merged on save)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_path()
        self._lock = threading.Lock()
        self._entries: dict[str, Choice] | None = None

    def _load(self) -> dict[str, Choice]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, Choice]:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {key: Choice.from_json(value) for key, value in raw.items()}
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable autotune cache %s (%s)", self.path, e)
            return {}

    def get(self, key: TuningKey) -> Choice | None:
        with self._lock:
            return self._load().get(str(key))

    def put(self, key: TuningKey, choice: Choice) -> None:
        with self._lock:
            entries = self._read() | self._load()  # keep what another process wrote meanwhile
            entries[str(key)] = choice
            self._entries = entries
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = json.dumps({k: v.to_json() for k, v in sorted(entries.items())}, indent=1)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, self.path)


def time_on_device(fn: Callable[[], Any], repeats: int = 10) -> float:
    """Median wall time of fn() (which returns arrays), after a compile-and-warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tune(
    key: TuningKey,
    candidates: dict[str, Callable[[], Any]],
    *,
    cache: TuningCache | None = None,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    configs: dict[str, MatmulConfig] | None = None,
) -> Choice:
    """Times every candidate (name -> thunk; "xla" is the baseline), keeps and caches the fastest.

    Candidates that fail to compile or run (too much shared memory, say) are skipped with a log line.
    """
    timer = timer or time_on_device
    times: dict[str, float] = {}
    for name, thunk in candidates.items():
        try:
            times[name] = timer(thunk)
        except Exception as e:  # noqa: BLE001 - any failure just removes the candidate
            log.info("autotune %s: %s failed (%s: %s)", key, name, type(e).__name__, e)
    if "xla" not in times:
        raise RuntimeError(f"autotune {key}: the XLA baseline itself failed to run")
    configs = configs or {}
    best = min(times, key=times.get)
    fused = [name for name in times if name in configs]
    best_fused = min(fused, key=times.get) if fused else None
    choice = Choice(
        impl="xla" if best == "xla" else "pallas",
        config=configs.get(best),
        source="measured",
        time_s=times[best],
        xla_time_s=times["xla"],
        fused_config=configs.get(best_fused),
        fused_time_s=times.get(best_fused),
    )
    log.info("autotune %s: %s (%.3g ms; xla %.3g ms)", key, best, times[best] * 1e3, times["xla"] * 1e3)
    if cache is not None:
        cache.put(key, choice)
    return choice


def synthetic_inputs(m: int, n: int, k: int, dtype: Any, *, quant_type: str, blocksize: int, double_quant: bool):
    """Random activations and a random quantized weight of the given shape, for timing."""
    from qlora_jax.quant import quantize

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, dtype)
    qt = quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return x, dy, qt
