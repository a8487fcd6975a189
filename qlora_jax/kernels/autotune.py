"""Measured kernel choices: the tuning space, the timing of candidates, and the persistent cache.

A choice is keyed by (op, GPU kind, M bucket, N, K, dtype, quant type, blocksize, double quant). Tuning a key
times the plain XLA path (dequantize, then cuBLAS) and at most ~16 fused configurations of the tuning space, each
on weights distinct per call (no L2 reuse), and keeps the fastest: a fused kernel is chosen only where it
measured faster than XLA. The time a shape takes to tune is bounded by construction: few repeats, and a budget
after which no further candidate is started.

The cache is a JSON file (default `~/.cache/qlora_jax/autotune.json`, or `$QLORA_JAX_AUTOTUNE_CACHE`), written
atomically and merged with what other processes wrote. `qlora-jax tune CONFIG.yaml` fills it for a model's shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_jax.kernels.decode import FMA_MAX_M, MAX_M, DecodeConfig
from qlora_jax.kernels.dequant import DequantConfig
from qlora_jax.kernels.matmul import MatmulConfig

__all__ = [
    "Choice",
    "TuningKey",
    "TuningCache",
    "KernelConfig",
    "m_bucket",
    "tuning_space",
    "default_fused_config",
    "tune",
    "cache_path",
    "config_to_json",
    "config_from_json",
    "MAX_CANDIDATES",
    "TUNE_BUDGET_S",
]

log = logging.getLogger(__name__)

OPS = ("forward", "backward")
KernelConfig = MatmulConfig | DecodeConfig
MAX_CANDIDATES = 16  # fused configurations timed per (op, M bucket, shape)
TUNE_BUDGET_S = 20.0  # no candidate is started after this many seconds of tuning one key


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

    @classmethod
    def parse(cls, text: str) -> TuningKey:
        """The inverse of str(key); raises ValueError for a malformed key."""
        parts = text.split("|")
        if len(parts) != 9 or parts[0] not in OPS or parts[8] not in ("True", "False"):
            raise ValueError(f"not a tuning key: {text!r}")
        op, kind, bucket, n, k, dtype, quant_type, blocksize, dq = parts
        return cls(op, kind, int(bucket), int(n), int(k), dtype, quant_type, int(blocksize), dq == "True")


def config_to_json(config: KernelConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    kernel = "decode" if isinstance(config, DecodeConfig) else "matmul"
    return {"kernel": kernel, **dataclasses.asdict(config)}


def config_from_json(data: dict[str, Any] | None) -> KernelConfig | None:
    if not data:
        return None
    data = dict(data)
    kernel = data.pop("kernel", "matmul")
    if kernel not in ("decode", "matmul"):
        raise ValueError(f"unknown kernel {kernel!r} in a tuning entry")
    return DecodeConfig(**data) if kernel == "decode" else MatmulConfig(**data)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The winner of one key: impl "pallas" (with `config`, a MatmulConfig or a DecodeConfig) or "xla"; also the
    best fused config even when XLA won (what impl="pallas" uses). `source` says where it comes from ("measured" on
    this machine, or a shipped table's provenance)."""

    impl: str
    config: KernelConfig | None = None
    source: str = "measured"
    time_s: float | None = None
    xla_time_s: float | None = None
    fused_config: KernelConfig | None = None
    fused_time_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"], out["fused_config"] = config_to_json(self.config), config_to_json(self.fused_config)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Choice:
        data = dict(data)
        data["config"], data["fused_config"] = (
            config_from_json(data.get("config")),
            config_from_json(data.get("fused_config")),
        )
        choice = cls(**data)
        if choice.impl not in ("xla", "pallas") or (choice.impl == "pallas" and choice.config is None):
            raise ValueError(f"a choice must be xla, or pallas with a config: {data}")
        return choice


# Tiles (block_n, block_k) of the decode kernel that ptxas fits in registers on sm_90 without spilling
# (`python -m qlora_jax.kernels.resources --op forward`, docs/kernels.md): the multiply-add path keeps a
# [block_n, 32] float32 accumulator per row of x, so it loses its wider tiles as M grows (at M = 2-4, 128 x 128,
# 64 x 256, 128 x 256 and 256 x 128 spill up to 1.3 KB a thread); the tensor-core path spills at 256 x 128.
_MMA_TILES = ((64, 128), (128, 128), (64, 256), (128, 256), (32, 256))
_FMA_TILES = {1: ((64, 128), (128, 128), (64, 256), (32, 256)), 2: ((64, 128), (32, 256)),
              4: ((64, 128), (32, 256))}  # fmt: skip


def _decode_space(m: int, k: int, blocksize: int) -> list[DecodeConfig]:
    """At most 12 decode configs: wide loads, split K; multiply-adds on CUDA cores for M <= 4; only tiles that do
    not spill registers at this M bucket (its largest M)."""
    dots = ("fma", "mma") if m <= FMA_MAX_M else ("mma",)
    shapes = [(64, 128, 4), (128, 128, 4), (64, 256, 2), (128, 256, 2), (256, 128, 2), (32, 256, 8)]
    configs = []
    for dot in dots:
        tiles = _FMA_TILES[m_bucket(m)] if dot == "fma" else _MMA_TILES
        for bn, bk, split in [shape for shape in shapes if shape[:2] in tiles][: 12 // len(dots)]:
            while split > 1 and k % (bk * split):
                split //= 2
            if k % bk == 0:
                configs.append(DecodeConfig(block_n=bn, block_k=bk, split_k=split, dot=dot, num_warps=4))
    return list(dict.fromkeys(configs))


def tuning_space(op: str, m: int, n: int, k: int, blocksize: int) -> list[KernelConfig]:
    """The fused configurations worth timing for this shape (all valid for it; at most MAX_CANDIDATES).

    forward, M <= 16: the decode kernel (12) and 4 split-K configs of the tiled kernel; forward, larger M: the
    tiled kernel's tensor-core tiles; backward: the transposed kernel's tiles.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    del n
    block_ks = [bk for bk in (64, 32, 128) if blocksize % bk == 0 and k % bk == 0]
    bk = block_ks[0]
    configs: list[KernelConfig]
    if op == "forward" and m <= MAX_M:
        configs = [*_decode_space(m, k, blocksize)]
        for bn, split in ((128, 4), (64, 8), (128, 2), (64, 4)):
            if k % (bk * split) == 0:
                configs.append(MatmulConfig(block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=4))
    elif op == "forward":
        configs = [
            MatmulConfig(block_m=bm, block_n=bn, block_k=kk, num_warps=w, num_stages=st)
            for bm, bn, w in ((128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4))
            for kk in block_ks[:2]
            for st in (3, 4)
        ]
    else:
        bms = (16, 64) if m <= MAX_M else (64, 128)
        configs = [
            MatmulConfig(block_m=bm, block_n=bn, block_k=kk, num_warps=w, num_stages=3)
            for bm in bms
            for bn in (32, 64)
            for kk in block_ks[:2]
            for w in (4, 8)
        ]
    return list(dict.fromkeys(configs))[:MAX_CANDIDATES]


def default_fused_config(op: str, m: int, n: int, k: int, blocksize: int, num_cores: int) -> KernelConfig:
    """The fused configuration impl="pallas" uses when nothing was measured: the decode kernel for forward at
    M <= 16 (K split so that about two programs run per SM of the GPU's `num_cores`:
    `qlora_jax.gpu_target.device_facts().sm_count`), the tiled kernels otherwise."""
    block_k = 64 if blocksize % 64 == 0 and k % 64 == 0 else 32
    if op == "backward" or m > MAX_M:
        return MatmulConfig(block_m=64, block_n=64, block_k=block_k)
    bn, bk = 64, 128 if k % 128 == 0 else 64
    split = 1
    while split < 16 and -(-n // bn) * split < 2 * num_cores and k % (bk * split * 2) == 0:
        split *= 2
    return DecodeConfig(block_n=bn, block_k=bk, split_k=split, dot="fma" if m <= FMA_MAX_M else "mma")


DEQUANT_SPACE = (
    DequantConfig(block_rows=32, block_cols=64),
    DequantConfig(block_rows=64, block_cols=64, num_warps=8),
    DequantConfig(block_rows=16, block_cols=128),
)


def cache_path() -> Path:
    if env := os.environ.get("QLORA_JAX_AUTOTUNE_CACHE"):
        return Path(env)
    return Path.home() / ".cache" / "qlora_jax" / "autotune.json"


def read_entries(path: Path) -> dict[str, Choice]:
    """The entries of a cache or table file; raises ValueError (naming the file and entry) if it is malformed."""
    try:
        raw = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of tuning entries")
    entries = {}
    for key, value in raw.items():
        try:
            TuningKey.parse(key)
            entries[key] = Choice.from_json(value)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: bad entry {key!r} ({e})") from e
    return entries


def write_entries(path: Path, entries: dict[str, Choice]) -> None:
    """Writes entries atomically (a reader never sees a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({k: v.to_json() for k, v in sorted(entries.items())}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(payload)
    os.replace(tmp, path)


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
            return read_entries(self.path)
        except ValueError as e:
            log.warning("ignoring the unreadable autotune cache %s (%s)", self.path, e)
            return {}

    def get(self, key: TuningKey) -> Choice | None:
        with self._lock:
            return self._load().get(str(key))

    def entries(self) -> dict[str, Choice]:
        with self._lock:
            return dict(self._load())

    def put(self, key: TuningKey, choice: Choice) -> None:
        with self._lock:
            entries = self._read() | self._load()  # keep what another process wrote meanwhile
            entries[str(key)] = choice
            self._entries = entries
            write_entries(self.path, entries)

    # Hashable by path, so that KernelOptions holding a cache stays a usable static argument.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, TuningCache) and other.path == self.path

    def __hash__(self) -> int:
        return hash(("TuningCache", str(self.path)))


def tune(
    key: TuningKey,
    candidates: dict[str, Callable[[], float]],
    *,
    cache: TuningCache | None = None,
    configs: dict[str, KernelConfig] | None = None,
    budget_s: float = TUNE_BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> Choice:
    """Runs every candidate (name -> a thunk returning its measured seconds a call; "xla" is the baseline and runs
    first), keeps and caches the fastest.

    Candidates that fail to compile or run (too much shared memory, say) are skipped with a log line; once
    `budget_s` seconds have passed, the remaining ones are skipped too (logged), so a key never tunes for long.
    Raises RuntimeError if the XLA baseline itself fails.
    """
    start = clock()
    times: dict[str, float] = {}
    names = sorted(candidates, key=lambda name: name != "xla")
    for index, name in enumerate(names):
        if name != "xla" and clock() - start > budget_s:
            log.warning("autotune %s: budget of %.0f s spent; %d candidates not timed", key, budget_s,
                        len(names) - index)  # fmt: skip
            break
        try:
            times[name] = float(candidates[name]())
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
    log.info("autotune %s: %s (%.3g us; xla %.3g us)", key, best, times[best] * 1e6, times["xla"] * 1e6)
    if cache is not None:
        cache.put(key, choice)
    return choice
