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
import functools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_jax import gpu_target
from qlora_jax.kernels import registry
from qlora_jax.kernels.decode import MAX_M, DecodeConfig
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
    return {"kernel": registry.config_name(config), **dataclasses.asdict(config)}


def config_from_json(data: dict[str, Any] | None) -> KernelConfig | None:
    """The config a tuning entry names ("kernel": a registry name; "matmul" when absent, as older entries)."""
    if not data:
        return None
    data = dict(data)
    return registry.config_from_name(data.pop("kernel", "matmul"), data)


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


def tuning_space(op: str, m: int, n: int, k: int, blocksize: int) -> list[KernelConfig]:
    """The fused configurations worth timing for this shape (all valid for it; at most MAX_CANDIDATES): the
    candidate spaces of the registry's kernels for `op` (`registry.candidates`).

    forward, M <= 16: the decode kernel's candidates and 4 split-K configs of the tiled kernel; forward, larger M:
    the tiled kernel's tensor-core tiles; backward: the transposed kernel's tiles.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return registry.candidates(op, m, n, k, blocksize)[:MAX_CANDIDATES]


def default_fused_config(op: str, m: int, n: int, k: int, blocksize: int, num_cores: int | None = None) -> KernelConfig:
    """The fused configuration impl="pallas" uses when nothing was measured: the decode kernel for forward at
    M <= 16 (`registry.decode_default`), the tiled kernels otherwise. `num_cores`: the GPU's SMs (default: the
    default device's, `gpu_target.device_facts().sm_count`)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if num_cores is None:
        num_cores = gpu_target.device_facts().sm_count
    if op == "forward" and m <= MAX_M:
        return registry.by_name("decode").default(m, n, k, blocksize, num_cores)
    return registry.by_name("matmul" if op == "forward" else "matmul_transposed").default(m, n, k, blocksize, num_cores)


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


@dataclasses.dataclass(frozen=True)
class TuningChoices:
    """Measured kernel choices as a value (`KernelOptions.tuning`): (key, Choice) pairs read once from a tuning
    cache (`load_choices`), hashed and compared by content, so that a compiled function is keyed by the choices it
    was traced with (a changed file, read again, is another value and compiles again) and nothing is read from a
    file while tracing."""

    entries: tuple[tuple[str, Choice], ...] = ()

    @functools.cached_property
    def _by_key(self) -> dict[str, Choice]:
        return dict(self.entries)

    def get(self, key: TuningKey) -> Choice | None:
        return self._by_key.get(str(key))

    def __len__(self) -> int:
        return len(self.entries)


def load_choices(path: Path | None = None) -> TuningChoices:
    """The choices a tuning cache holds (default: `cache_path()`, what `qlora-jax tune` writes); empty when there is
    no file, and a corrupt one is reported and ignored (`TuningCache`)."""
    return TuningCache(path).choices()


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

    def choices(self) -> TuningChoices:
        """What the cache holds now, as a value (`TuningChoices`)."""
        return TuningChoices(tuple(sorted(self.entries().items())))

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
            log.warning(
                "autotune %s: budget of %.0f s spent; %d candidates not timed", key, budget_s, len(names) - index
            )
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
