"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`, both directions.

Keys follow PEFT: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]), `.lora_B.weight`
([out, r]) and, for DoRA, `.lora_magnitude_vector` ([out]). Our stacked layers are written one layer at a time,
each at its own rank, and only the layers that have an adapter (docs/lora.md). The config's targeting fields
(target_modules, exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern) mean what
they mean in PEFT both ways (`qlora_jax.lora_targets`), so PEFT rebuilds exactly the adapters we wrote, and we
load exactly the ones a PEFT adapter holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qlora_jax.convert import moe_peft
from qlora_jax.convert.finite import non_finite
from qlora_jax.errors import InputError
from qlora_jax.files import staged_directory
from qlora_jax.lora import ExpertLoRA, LoRA, LoraConfig, apply_lora, target_layers
from qlora_jax.lora_targets import converted_config_fields
from qlora_jax.models import DecoderLM
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.models.names import layer_name, split_layer_name
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
# PEFT fields that would change the model in ways we do not implement, with their no-op values.
_UNSUPPORTED = {"modules_to_save": (None, []), "fan_in_fan_out": (False, None), "lora_bias": (False, None),
                "layer_replication": (None, []), "trainable_token_indices": (None, [], {}),
                "use_qalora": (False, None), "alora_invocation_tokens": (None, []),
                "megatron_config": (None, {}), "use_bdlora": (False, None)}  # fmt: skip


class PeftFormatError(InputError):
    """A PEFT adapter that cannot be read, or does not fit the model."""


def _adapted(model: nnx.Module) -> dict[str, QLinear]:
    """Every module with an adapter: linear layers, and a mixture of experts' experts and router (docs/moe.md)."""
    return {
        ".".join(str(p) for p in path): module
        for path, module in nnx.iter_graph(model)
        if isinstance(module, QLinear | QExperts | TopKRouter) and module.lora is not None
    }


def _layers(module: QLinear) -> list[int | None]:
    """The layer indices of a module's adapter ([None] outside the stacked layers). The scaling may be abstract
    (a checkpoint's export builds the base as shapes only)."""
    return [None] if module.lora.scaling.get_value().ndim == 0 else list(range(len(module.lora.ranks)))


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _config_json(model: DecoderLM, config: LoraConfig, adapted: dict[str, QLinear],
                 base_model_name_or_path: str | None) -> dict:  # fmt: skip
    target = config.target_modules
    if converted := converted_config_fields(model, config):  # a mixture of experts: what PEFT saves (docs/moe.md)
        target = converted["target_modules"]
    elif isinstance(target, str) and target.lower() == "all-linear":
        # what PEFT writes for it: the linear layers' names (our modules' names are unique per kind of layer)
        target = sorted({name.split(".")[-1] for name in adapted})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _jsonable(target),
        "exclude_modules": _jsonable(config.exclude_modules),
        "layers_to_transform": _jsonable(config.layers_to_transform),
        "layers_pattern": _jsonable(config.layers_pattern),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": config.bias,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        "target_parameters": _jsonable(config.target_parameters),
    } | {k: v for k, v in converted.items() if k != "target_modules"}


def _check_selection(model: DecoderLM, config: LoraConfig, adapted: dict[str, QLinear], where: str) -> None:
    """The adapters of `model` must be exactly those `config` selects, per layer and rank: what PEFT will build."""
    try:
        wanted = {path: t.ranks for path, t in target_layers(model, config).items()}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    have = {path: module.lora.ranks for path, module in adapted.items()}
    if wanted != have:
        diff = sorted(set(wanted.items()) ^ set(have.items()))[0][0]
        raise ValueError(
            f"{where}: the model's adapters are not the ones its config selects (first difference: {diff}, "
            f"adapter ranks per layer {have.get(diff)}, config {wanted.get(diff)}); PEFT would load another adapter"
        )


def save_peft_adapter(
    model: DecoderLM,
    directory: str | os.PathLike,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    template: dict[str, Any] | None = None,
) -> Path:
    """Writes the model's adapters as PEFT would (`PeftModel.from_pretrained` loads them onto the transformers
    model): every layer that has one, at its own rank. `config` must be the LoraConfig the adapters were made
    with (checked: PEFT rebuilds the adapters from it). `template`: an adapter_config.json read earlier
    (`read_adapter_config_dict`) whose other fields are kept as they were, so that PEFT -> qlora-jax -> PEFT changes
    nothing. Returns the directory."""
    adapted = _adapted(model)
    if not adapted:
        raise ValueError("the model has no LoRA adapters to save")
    fields = _config_json(model, config, adapted, base_model_name_or_path)
    if template is not None:
        fields = dict(template) | {k: v for k, v in fields.items() if k not in template or k in _OURS}
        if base_model_name_or_path is None:
            fields["base_model_name_or_path"] = template.get("base_model_name_or_path")
        if isinstance(template.get("target_modules"), list | str):
            fields["target_modules"] = template["target_modules"]
    _check_selection(model, _lora_config(fields, ADAPTER_CONFIG), adapted, str(directory))
    tensors: dict[str, np.ndarray] = {}
    tensors.update(moe_peft.save_tensors(model))  # a mixture of experts' expert adapters, PEFT's layout
    for path, module in adapted.items():
        lora: LoRA = module.lora
        if isinstance(lora, ExpertLoRA):
            continue
        for layer in _layers(module):
            r = lora.ranks[layer or 0]
            if r == 0:
                continue  # no adapter on this layer
            index = () if layer is None else (layer,)
            name = _PREFIX + layer_name(path, layer)
            # contiguous copies: safetensors writes an array's buffer as it lies, whatever its strides
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora.lora_A[...][index][:r], np.float32)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora.lora_B[...][index][:, :r], np.float32)
            if lora.lora_magnitude_vector is not None:
                magnitude = lora.lora_magnitude_vector[...][index]
                tensors[f"{name}.lora_magnitude_vector"] = np.ascontiguousarray(magnitude, np.float32)
    for key, value in tensors.items():
        if problem := non_finite(value):
            raise PeftFormatError(f"{directory}: adapter tensor {key} {problem}; nothing was written")
    directory = Path(directory)
    with staged_directory(directory) as staging:  # a reader never sees half an adapter
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(fields, indent=2))
    return directory


# Fields whose values come from the adapter itself even when a template is given.
_OURS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "peft_type", "exclude_modules",
         "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "target_parameters")  # fmt: skip


def read_adapter_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise PeftFormatError(f"{path}: cannot read the adapter config ({e})") from e
    if not isinstance(raw, dict):
        raise PeftFormatError(f"{path}: expected a JSON object")
    return raw


def _lora_config(raw: dict[str, Any], path: Any) -> LoraConfig:
    if raw.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for field, defaults in _UNSUPPORTED.items():
        if raw.get(field) not in defaults:
            raise PeftFormatError(f"{path}: {field}={raw[field]!r} is not supported")

    def get(name: str, default: Any = None) -> Any:
        value = raw.get(name)
        return default if value is None else value

    try:
        return LoraConfig(
            r=int(raw["r"]),
            lora_alpha=float(get("lora_alpha", raw["r"])),
            lora_dropout=float(get("lora_dropout", 0.0)),
            target_modules=get("target_modules"),
            exclude_modules=get("exclude_modules") or None,
            layers_to_transform=get("layers_to_transform") if get("layers_to_transform") != [] else None,
            layers_pattern=get("layers_pattern") or None,
            rank_pattern=get("rank_pattern", {}),
            alpha_pattern=get("alpha_pattern", {}),
            use_rslora=bool(get("use_rslora", False)),
            use_dora=bool(get("use_dora", False)),
            bias=get("bias", "none"),
            target_parameters=get("target_parameters") or None,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise PeftFormatError(f"{path}: {f'missing field {e}' if isinstance(e, KeyError) else e}") from e


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory; PeftFormatError for what does not read or is not supported."""
    return _lora_config(read_adapter_config_dict(directory), Path(directory) / ADAPTER_CONFIG)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """{key: float32 array} of an adapter file; PeftFormatError for an unreadable file, a non-float or non-finite
    tensor."""
    try:
        # "flax" reads bfloat16 too (PEFT adapters trained in bf16), which numpy alone cannot
        with safe_open(str(path), framework="flax") as f:
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PeftFormatError(f"{path}: not a readable safetensors file ({e})") from e
    tensors = {}
    for key, value in raw.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise PeftFormatError(f"{path}: tensor {key} has dtype {value.dtype}, not a floating-point one")
        tensors[key] = np.asarray(value, np.float32)
        if problem := non_finite(tensors[key]):
            raise PeftFormatError(f"{path}: tensor {key} {problem}")
    return tensors


def read_peft_adapter(model: DecoderLM, directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, dict]]:
    """Reads a PEFT adapter directory and checks all of it against `model` without changing the model: the layers
    its config selects by PEFT's rules must be exactly the ones the file holds, each tensor with the shape its
    layer's rank gives.

    Returns (config, {module path: {"lora_A", "lora_B"[, "lora_magnitude_vector"]: array}}), float32 arrays laid
    out as `apply_lora` lays them out: for a stacked module [num_layers, max_rank, in] / [num_layers, out,
    max_rank] / [num_layers, out], zero-padded past each layer's rank (docs/lora.md). Raises PeftFormatError naming
    the file and the tensor.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    tensors = _read_tensors(weights_path)
    linears = {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model)
               if isinstance(m, QLinear | TopKRouter)}  # fmt: skip
    num_layers = model.config.num_layers
    try:
        targets = target_layers(model, config)
    except ValueError as e:
        raise PeftFormatError(f"{directory / ADAPTER_CONFIG}: {e}") from e
    # a mixture of experts' expert adapters (either PEFT layout) apart, checked against the selection: docs/moe.md
    tensors, expert_values = moe_peft.split_tensors(model, targets, tensors, str(weights_path), PeftFormatError)
    by_layer: dict[tuple[str, int | None], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise PeftFormatError(f"{weights_path}: unexpected tensor {key} (not a LoRA weight)")
        name = match.group(1)
        path, layer = split_layer_name(name)
        if path not in linears or (layer is not None and layer >= num_layers):
            raise PeftFormatError(
                f"{weights_path}: {name} is not a linear layer of this {model.config.model_type} model "
                f"({num_layers} layers) -- an adapter for another architecture?"
            )
        by_layer.setdefault((path, layer), {})[_FIELDS[match.group(2)]] = value
    expected = set()
    for path, target in targets.items():  # every tensor checked before anything is allocated
        if path in expert_values:
            continue
        module = linears[path]
        needs = {"lora_A": (None, module.in_features), "lora_B": (module.out_features, None)}
        if config.use_dora:
            needs["lora_magnitude_vector"] = (module.out_features,)
        for i, r in enumerate(target.ranks):
            if r == 0:
                continue  # no adapter on this layer
            layer = i if target.stacked else None
            expected.add((path, layer))
            name = layer_name(path, layer)
            fields = by_layer.get((path, layer))
            if fields is None:
                raise PeftFormatError(f"{weights_path}: no tensors for {name}, which its config adapts")
            if unused := sorted(set(fields) - set(needs)):
                raise PeftFormatError(f"{weights_path}: {name}.{unused[0]} is not part of this adapter "
                                      f"(use_dora={config.use_dora} in {ADAPTER_CONFIG})")  # fmt: skip
            for field, need in needs.items():
                need = tuple(r if n is None else n for n in need)
                value = fields.get(field)
                if value is None:
                    raise PeftFormatError(f"{weights_path}: {name}.{field} is missing")
                if value.shape != need:
                    raise PeftFormatError(f"{weights_path}: {name}.{field} has shape {value.shape}, the model needs "
                                          f"{need} (rank {r} from the config)")  # fmt: skip
    extra = sorted(set(by_layer) - expected, key=str)
    if extra:
        path, layer = extra[0]
        raise PeftFormatError(f"{weights_path}: holds {layer_name(path, layer)}, which its config "
                              f"(target_modules={config.target_modules!r}) does not adapt")  # fmt: skip
    values: dict[str, dict[str, np.ndarray]] = dict(expert_values)
    for path, target in targets.items():
        if path in expert_values:
            continue
        module, r_max = linears[path], target.max_rank
        lead = (len(target.ranks),) if target.stacked else ()
        values[path] = {"lora_A": np.zeros(lead + (r_max, module.in_features), np.float32),
                        "lora_B": np.zeros(lead + (module.out_features, r_max), np.float32)}  # fmt: skip
        if config.use_dora:
            values[path]["lora_magnitude_vector"] = np.zeros(lead + (module.out_features,), np.float32)
        for i, r in enumerate(target.ranks):
            if r == 0:
                continue
            fields = by_layer[(path, i if target.stacked else None)]
            index = (i,) if target.stacked else ()
            values[path]["lora_A"][index][:r] = fields["lora_A"]
            values[path]["lora_B"][index][:, :r] = fields["lora_B"]
            if config.use_dora:
                values[path]["lora_magnitude_vector"][index] = fields["lora_magnitude_vector"]
    return config, values


def load_peft_adapter(model: DecoderLM, directory: str | os.PathLike) -> LoraConfig:
    """Adds the adapters of a PEFT directory to `model` (which must have none yet; ValueError otherwise) on the
    layers its config selects by PEFT's rules, each at its rank, after `read_peft_adapter` has checked all of it:
    a bad adapter (PeftFormatError) leaves the model unchanged. Returns the adapter's LoraConfig."""
    if _adapted(model):
        raise ValueError("the model already has LoRA adapters")
    config, values = read_peft_adapter(model, directory)
    apply_lora(model, dataclasses.replace(config, init_lora_weights=True), rngs=nnx.Rngs(0))
    adapted = _adapted(model)
    for path, fields in values.items():
        for field, value in fields.items():
            getattr(adapted[path].lora, field).set_value(jnp.asarray(value))
    return config
