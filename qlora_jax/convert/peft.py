"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`, both directions.

Keys follow PEFT: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]), `.lora_B.weight`
([out, r]) and, for DoRA, `.lora_magnitude_vector` ([out]). Our stacked layers are written one layer at a time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from qlora_jax.convert.finite import non_finite
from qlora_jax.errors import InputError
from qlora_jax.files import staged_directory
from qlora_jax.lora import LoRA, LoraConfig, apply_lora
from qlora_jax.models import DecoderLM
from qlora_jax.nn import QLinear

__all__ = [
    "save_peft_adapter",
    "load_peft_adapter",
    "read_peft_adapter",
    "read_adapter_config",
    "read_adapter_config_dict",
    "PeftFormatError",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_FIELDS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude_vector"}


class PeftFormatError(InputError):
    """A PEFT adapter that cannot be read, or does not fit the model."""


def _adapted(model: nnx.Module) -> dict[str, QLinear]:
    return {
        ".".join(str(p) for p in path): module
        for path, module in nnx.iter_graph(model)
        if isinstance(module, QLinear) and module.lora is not None
    }


def _layer_names(path: str, num_layers: int, stacked: bool) -> list[tuple[str, int | None]]:
    if not stacked:
        return [(path, None)]
    return [(path.replace("model.layers.", f"model.layers.{i}.", 1), i) for i in range(num_layers)]


def _is_stacked(path: str) -> bool:
    return path.startswith("model.layers.")


def _config_json(config: LoraConfig, target_names: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
    target = config.target_modules
    if isinstance(target, tuple) or target == "all-linear":
        target = sorted({name.split(".")[-1] for name in target_names})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": config.bias,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(
    model: DecoderLM,
    directory: str | os.PathLike,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    template: dict[str, Any] | None = None,
) -> Path:
    """Writes the model's adapters as PEFT would (`PeftModel.from_pretrained` loads them onto the transformers
    model). `template`: an adapter_config.json read earlier (`read_adapter_config_dict`) whose other fields are
    kept as they were, so that PEFT -> qlora-jax -> PEFT changes nothing. Returns the directory."""
    adapted = _adapted(model)
    if not adapted:
        raise ValueError("the model has no LoRA adapters to save")
    tensors: dict[str, np.ndarray] = {}
    num_layers = model.config.num_layers
    for path, module in adapted.items():
        lora: LoRA = module.lora
        for name, layer in _layer_names(path, num_layers, _is_stacked(path)):
            index = () if layer is None else (layer,)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.asarray(lora.lora_A[...][index], np.float32)
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.asarray(lora.lora_B[...][index], np.float32)
            if lora.lora_magnitude_vector is not None:
                magnitude = np.asarray(lora.lora_magnitude_vector[...][index], np.float32)
                tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitude
    for key, value in tensors.items():
        if problem := non_finite(value):
            raise PeftFormatError(f"{directory}: adapter tensor {key} {problem}; nothing was written")
    fields = _config_json(config, list(adapted), base_model_name_or_path)
    if template is not None:
        fields = dict(template) | {k: v for k, v in fields.items() if k not in template or k in _OURS}
        if base_model_name_or_path is None:
            fields["base_model_name_or_path"] = template.get("base_model_name_or_path")
        if isinstance(template.get("target_modules"), list | str):
            fields["target_modules"] = template["target_modules"]
    directory = Path(directory)
    with staged_directory(directory) as staging:  # a reader never sees half an adapter
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(fields, indent=2))
    return directory


# Fields whose values come from the adapter itself even when a template is given.
_OURS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "peft_type")


def read_adapter_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise PeftFormatError(f"{path}: cannot read the adapter config ({e})") from e
    if not isinstance(raw, dict):
        raise PeftFormatError(f"{path}: expected a JSON object")
    return raw


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / ADAPTER_CONFIG
    raw = read_adapter_config_dict(directory)
    if raw.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for field in ("rank_pattern", "alpha_pattern"):
        if raw.get(field):
            raise PeftFormatError(f"{path}: {field} (per-module ranks or alphas) is not supported")
    if raw.get("modules_to_save"):
        raise PeftFormatError(f"{path}: modules_to_save is not supported")
    target = raw.get("target_modules")
    target = tuple(target) if isinstance(target, list) else target
    try:
        return LoraConfig(
            r=int(raw["r"]),
            lora_alpha=float(raw.get("lora_alpha", raw["r"])),
            lora_dropout=float(raw.get("lora_dropout") or 0.0),
            target_modules=target,
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            bias=raw.get("bias", "none"),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise PeftFormatError(f"{path}: {f'missing field {e}' if isinstance(e, KeyError) else e}") from e


def read_peft_adapter(model: DecoderLM, directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, dict]]:
    """Reads a PEFT adapter directory and checks it against `model` without changing the model: every tensor must
    name a linear layer of this model (all its layers, for a stacked one) with the shape the config's `r` gives.

    Returns (config, {module path: {"lora_A": array, "lora_B": ..., ["lora_magnitude_vector": ...]}}), arrays
    float32 and stacked over layers for `model.layers.*` modules. Raises PeftFormatError naming the file and tensor.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PeftFormatError(f"{weights_path}: not a readable safetensors file ({e})") from e
    by_module: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise PeftFormatError(f"{weights_path}: unexpected tensor {key} (not a LoRA weight)")
        if value.dtype.kind != "f" and not value.dtype.name.startswith("bfloat"):
            raise PeftFormatError(f"{weights_path}: tensor {key} has dtype {value.dtype}, not a floating-point one")
        if problem := non_finite(value):
            raise PeftFormatError(f"{weights_path}: tensor {key} {problem}")
        by_module.setdefault(match.group(1), {})[_FIELDS[match.group(2)]] = value
    linears = {}
    num_layers = model.config.num_layers
    grouped: dict[str, dict[int | None, dict[str, np.ndarray]]] = {}
    for name, fields in by_module.items():
        layer_match = re.match(r"^model\.layers\.(0|[1-9][0-9]*)\.(.+)$", name)
        path, layer = (
            (f"model.layers.{layer_match.group(2)}", int(layer_match.group(1))) if layer_match else (name, None)
        )
        linears[path] = linears.get(path) or _linear_at(model, path)
        if linears[path] is None or _is_stacked(path) != (layer is not None) or (layer or 0) >= num_layers:
            raise PeftFormatError(
                f"{weights_path}: {name} is not a linear layer of this {model.config.model_type} model "
                f"({num_layers} layers) -- an adapter for another architecture?"
            )
        grouped.setdefault(path, {})[layer] = fields
    if not grouped:
        raise PeftFormatError(f"{weights_path}: holds no LoRA weights")
    values: dict[str, dict[str, np.ndarray]] = {}
    for path, layers in grouped.items():
        module = linears[path]
        stacked = _is_stacked(path)
        expected_layers = list(range(num_layers)) if stacked else [None]
        if set(layers) != set(expected_layers):
            found = sorted(layer for layer in layers if layer is not None)
            raise PeftFormatError(f"{weights_path}: {path} has adapters for layers {found}, not all {num_layers}")
        shapes = {"lora_A": (config.r, module.in_features), "lora_B": (module.out_features, config.r)}
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (module.out_features,)
        values[path] = {}
        for field, shape in shapes.items():
            per_layer = [layers[i].get(field) for i in expected_layers]
            if any(v is None for v in per_layer):
                raise PeftFormatError(f"{weights_path}: {path}.{field} is missing")
            for layer, value in zip(expected_layers, per_layer, strict=True):
                if value.shape != shape:
                    where = path if layer is None else path.replace("model.layers.", f"model.layers.{layer}.", 1)
                    raise PeftFormatError(f"{weights_path}: {where}.{field} has shape {value.shape}, the model "
                                          f"needs {shape} (r={config.r} in {ADAPTER_CONFIG})")  # fmt: skip
            values[path][field] = np.stack(per_layer).astype(np.float32) if stacked else per_layer[0].astype(np.float32)
    return config, values


def load_peft_adapter(model: DecoderLM, directory: str | os.PathLike) -> LoraConfig:
    """Adds the adapters of a PEFT directory to `model` (which must have none yet), after `read_peft_adapter` has
    checked all of it (a bad adapter leaves the model unchanged). Returns the adapter's LoraConfig."""
    config, values = read_peft_adapter(model, directory)
    apply_lora(model, _with_targets(config, tuple(sorted(values))), rngs=nnx.Rngs(0))
    for path, fields in values.items():
        for field, value in fields.items():
            getattr(_linear_at(model, path).lora, field).set_value(jnp.asarray(value, jnp.float32))
    return config


def _linear_at(model: DecoderLM, path: str) -> QLinear | None:
    """The linear layer at a dotted module path (`model.layers.self_attn.q_proj`), or None."""
    node: Any = model
    for part in path.split("."):
        if not part.isidentifier() or part.startswith("_"):
            return None
        node = getattr(node, part, None)
    return node if isinstance(node, QLinear) else None


def _with_targets(config: LoraConfig, paths: tuple[str, ...]) -> LoraConfig:
    """The same config, targeting exactly the modules the adapter file holds."""
    import dataclasses

    pattern = "|".join(re.escape(p) for p in paths)
    return dataclasses.replace(config, target_modules=f"(?:{pattern})")
