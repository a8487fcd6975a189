"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`, both directions.

Keys follow PEFT: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]), `.lora_B.weight`
([out, r]) and, for DoRA, `.lora_magnitude_vector` ([out]). Our stacked layers are written one layer at a time,
each at its own rank, and only the layers that have an adapter (docs/lora.md). The config's targeting fields
(target_modules, exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern) mean what
they mean in PEFT both ways (`qlora_jax.lora.targets`), so PEFT rebuilds exactly the adapters we wrote, and we
load exactly the ones a PEFT adapter holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qlora_jax.convert import moe_peft
from qlora_jax.convert.finite import non_finite
from qlora_jax.convert.merge import layer_of
from qlora_jax.convert.moe_io import expert_modules
from qlora_jax.convert.peft_tokens import (
    read_token_tensors,
    resized_from,
    set_token_values,
    token_targets_of,
    token_tensors,
)
from qlora_jax.errors import InputError
from qlora_jax.files import output_error, staged_directory
from qlora_jax.integrity import check_tensor, checksummed_metadata, stored_checksums
from qlora_jax.lora import ExpertLoRA, LoRA, LoraConfig, apply_lora, target_layers
from qlora_jax.lora.targets import converted_config_fields
from qlora_jax.models import DecoderLM
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.models.names import hf_module_name, layer_name, module_name_from_hf, split_layer_name
from qlora_jax.nn import QLinear
from qlora_jax.tokens import token_targets

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

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_FIELDS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude_vector"}
# PEFT fields that would change the model in ways we do not implement, with their no-op values.
_UNSUPPORTED = {
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
    "use_bdlora": (False, None),
}


# PEFT initializations that change the base weights (W - scaling B0 A0 with the adapter's initial B0, A0 taken from
# W) and redo that when PEFT loads the adapter. pissa and olora are computed from the base alone (an SVD, a QR):
# such an adapter is applied here as PEFT's own conversion would write it (`_as_plain_lora`). The others need what
# only their training run had: a random sketch (pissa_niter_N), data (corda), gradients (lora_ga).
_REPRODUCIBLE_BASE_CHANGES = ("pissa", "olora")
_BASE_CHANGES = ("pissa", "olora", "corda", "lora_ga")
# PEFT initializations after which the base is left as it was: the adapter means what a plain LoRA means (LoftQ
# adapters, on the LoftQ-initialized base they were trained with).
_PLAIN_INITS = (True, False, None, "gaussian", "eva", "loftq", "orthogonal", "mica")
_CONVERSION = (
    "convert it to a plain LoRA adapter with PEFT: peft_model.save_pretrained(out_dir, "
    "path_initial_model_for_weight_conversion=<the adapter saved right after initialization>)"
)


def _changes_base(init: Any) -> bool:
    return isinstance(init, str) and init.lower().startswith(_BASE_CHANGES)


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


def _config_json(
    model: DecoderLM, config: LoraConfig, adapted: dict[str, QLinear], base_model_name_or_path: str | None
) -> dict:
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
        "modules_to_save": _jsonable(config.modules_to_save),
        "trainable_token_indices": _token_indices_json(config.trainable_token_indices),
        "revision": None,
        "target_parameters": _jsonable(config.target_parameters),
    } | {k: v for k, v in converted.items() if k != "target_modules"}


def _token_indices_json(value: Any) -> Any:
    return {k: list(v) for k, v in value.items()} if isinstance(value, dict) else _jsonable(value)


def _check_selection(model: DecoderLM, config: LoraConfig, adapted: dict[str, QLinear], where: str) -> None:
    """The adapters of `model` must be exactly those `config` selects, per layer and rank: what PEFT will build."""
    try:
        wanted = {path: t.ranks for path, t in target_layers(model, config).items()}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    have = {path: module.lora.ranks for path, module in adapted.items()}
    # the trained embedding rows too (trainable_token_indices, modules_to_save)
    wanted.update(_rows_of(config))
    have.update({path: ("rows", ids) for path, ids in token_targets_of(model).items()})
    if wanted != have:
        diff = sorted(set(wanted.items()) ^ set(have.items()))[0][0]
        raise ValueError(
            f"{where}: the model's adapters are not the ones its config selects (first difference: {diff}, "
            f"adapter ranks per layer {have.get(diff)}, config {wanted.get(diff)}); PEFT would load another adapter"
        )


def _rows_of(config: LoraConfig) -> dict[str, Any]:
    return {
        path: ("rows", ids)
        for path, ids in token_targets(config.trainable_token_indices, config.modules_to_save).items()
    }


def save_peft_adapter(
    model: DecoderLM,
    directory: str | os.PathLike,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    template: dict[str, Any] | None = None,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """Writes the model's adapters as PEFT would (`PeftModel.from_pretrained` loads them onto the transformers
    model): every layer that has one, at its own rank. `config` must be the LoraConfig the adapters were made
    with (checked: PEFT rebuilds the adapters from it). `template`: an adapter_config.json read earlier
    (`read_adapter_config_dict`) whose other fields are kept as they were, so that PEFT -> qlora-jax -> PEFT changes
    nothing. Trained embedding rows (`trainable_token_indices`, `modules_to_save`) are written as PEFT writes them;
    `save_embedding_layers` (PEFT's argument) also writes the resized embedding and head, so that PEFT computes our
    logits whatever initialized its own resized rows: "auto" when `base_model_name_or_path` is a local model whose
    vocabulary differs from the model's (`convert.peft_tokens`). Returns the directory."""
    adapted = _adapted(model)
    if not adapted and not token_targets_of(model):
        raise ValueError("the model has no LoRA adapters to save")
    fields = _config_json(model, config, adapted, base_model_name_or_path)
    if template is not None:
        fields = dict(template) | {k: v for k, v in fields.items() if k not in template or k in _OURS}
        if base_model_name_or_path is None:
            fields["base_model_name_or_path"] = template.get("base_model_name_or_path")
        if isinstance(template.get("target_modules"), list | str):
            fields["target_modules"] = template["target_modules"]
    elif model.config.multimodal_config is not None:
        fields["exclude_modules"] = _text_only(fields["exclude_modules"])
    if _changes_base(fields.get("init_lora_weights")):  # loaded here as PEFT's conversion (`_as_plain_lora`)
        fields["init_lora_weights"] = True
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
            name = _PREFIX + hf_module_name(layer_name(path, layer), model.config.text_model_path)
            # contiguous copies: safetensors writes an array's buffer as it lies, whatever its strides
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora.lora_A[...][index][:r], np.float32)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora.lora_B[...][index][:, :r], np.float32)
            if lora.lora_magnitude_vector is not None:
                magnitude = lora.lora_magnitude_vector[...][index]
                tensors[f"{name}.lora_magnitude_vector"] = np.ascontiguousarray(magnitude, np.float32)
    if save_embedding_layers == "auto":
        save_embedding_layers = resized_from(model, fields.get("base_model_name_or_path"))
    # trained embedding rows (PEFT's trainable tokens / modules_to_save), the resized tables
    tensors.update(token_tensors(model, save_embedding_layers=bool(save_embedding_layers)))
    for key, value in tensors.items():
        if problem := non_finite(value):
            raise PeftFormatError(f"{directory}: adapter tensor {key} {problem}; nothing was written")
    directory = Path(directory)
    try:
        with staged_directory(directory) as staging:  # a reader never sees half an adapter
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata=checksummed_metadata(tensors, {"format": "pt"}))
            (staging / ADAPTER_CONFIG).write_text(json.dumps(fields, indent=2))
    except (SafetensorError, OSError) as e:  # a full disk, no permission: one line, the old adapter unchanged
        raise output_error(e, directory, "the adapter") from e
    return directory


# Fields whose values come from the adapter itself even when a template is given.
_OURS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "bias",
    "peft_type",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "modules_to_save",
    "trainable_token_indices",
)


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
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in _REPRODUCIBLE_BASE_CHANGES:
        if raw.get("use_dora"):
            raise PeftFormatError(f"{path}: init_lora_weights={init!r} with use_dora is not supported; {_CONVERSION}")
    elif _changes_base(init):
        raise PeftFormatError(
            f"{path}: init_lora_weights={init!r}: PEFT changed the base weights when it initialized this adapter, "
            f"from what only that run had (a random sketch, data or gradients), so neither PEFT nor this package can "
            f"rebuild the base it was trained on; {_CONVERSION}"
        )
    elif init not in _PLAIN_INITS:
        raise PeftFormatError(f"{path}: init_lora_weights={init!r} is not an initialization this package knows")

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
            trainable_token_indices=get("trainable_token_indices"),
            modules_to_save=get("modules_to_save"),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise PeftFormatError(f"{path}: {f'missing field {e}' if isinstance(e, KeyError) else e}") from e


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory; PeftFormatError for what does not read or is not supported."""
    return _lora_config(read_adapter_config_dict(directory), Path(directory) / ADAPTER_CONFIG)


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an adapter file, from its header only (no tensor data is read); PeftFormatError for an
    unreadable file or a tensor that is not floating-point."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            headers = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(view.get_shape()) for key, view in headers.items()}
            dtypes = {key: view.get_dtype() for key, view in headers.items()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PeftFormatError(f"{path}: not a readable safetensors file ({e})") from e
    for key, dtype in dtypes.items():
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise PeftFormatError(f"{path}: tensor {key} has dtype {dtype}, not a floating-point one")
    return shapes


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """{key: float32 array} of an adapter file whose shapes have been checked (`_read_shapes`); PeftFormatError
    for an unreadable or non-finite tensor, IntegrityError for one that differs from its recorded checksum."""
    try:
        # "flax" reads bfloat16 too (PEFT adapters trained in bf16), which numpy alone cannot
        with safe_open(str(path), framework="flax") as f:
            sums = stored_checksums(f.metadata(), path)
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PeftFormatError(f"{path}: not a readable safetensors file ({e})") from e
    tensors = {}
    for key, value in raw.items():
        check_tensor(path, key, np.asarray(value), sums)
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
    shapes = _read_shapes(weights_path)  # every shape is checked against the model before any data is read
    linears = {
        ".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, QLinear | TopKRouter)
    }
    num_layers = model.config.num_layers
    try:
        targets = target_layers(model, config)
    except ValueError as e:
        raise PeftFormatError(f"{directory / ADAPTER_CONFIG}: {e}") from e
    # a mixture of experts' expert adapters (either PEFT layout) apart, read and checked against the selection once
    # the other tensors' shapes are (docs/moe.md); transformers 4's Mixtral router keys as transformers 5 names them
    expert_keys = moe_peft.expert_keys(shapes)
    shapes = {moe_peft.router_key(k): v for k, v in shapes.items() if k not in expert_keys}
    expert_paths = set(expert_modules(model))
    by_layer: dict[tuple[str, int | None], dict[str, str]] = {}
    outside: list[str] = []  # adapters of an image-text model's vision tower or projector
    others: list[str] = []  # trained embedding rows and tables (convert.peft_tokens), or unexpected
    for key in shapes:
        match = _KEY.match(key)
        if match is None:
            others.append(key)
            continue
        name = module_name_from_hf(match.group(1), model.config.text_model_path)
        if name is None:
            outside.append(key)
            continue
        path, layer = split_layer_name(name)
        if path not in linears or (layer is not None and layer >= num_layers):
            raise PeftFormatError(
                f"{weights_path}: {name} is not a linear layer of this {model.config.model_type} model "
                f"({num_layers} layers) -- an adapter for another architecture?"
            )
        by_layer.setdefault((path, layer), {})[_FIELDS[match.group(2)]] = key
    expected = set()
    for path, target in targets.items():  # every tensor checked before anything is allocated
        if path in expert_paths:
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
                raise PeftFormatError(
                    f"{weights_path}: {name}.{unused[0]} is not part of this adapter "
                    f"(use_dora={config.use_dora} in {ADAPTER_CONFIG})"
                )
            for field, need in needs.items():
                need = tuple(r if n is None else n for n in need)
                key = fields.get(field)
                if key is None:
                    raise PeftFormatError(f"{weights_path}: {name}.{field} is missing")
                if shapes[key] != need:
                    raise PeftFormatError(
                        f"{weights_path}: {name}.{field} has shape {shapes[key]}, the model needs "
                        f"{need} (rank {r} from the config)"
                    )
    extra = sorted(set(by_layer) - expected, key=str)
    if extra:
        path, layer = extra[0]
        raise PeftFormatError(
            f"{weights_path}: holds {layer_name(path, layer)}, which its config "
            f"(target_modules={config.target_modules!r}) does not adapt"
        )
    table = (model.config.vocab_size, model.config.hidden_size)
    for key in others:  # no table is larger than the (resized) embedding; peft_tokens checks exact shapes once read
        shape = shapes[key]
        if math.prod(shape) > math.prod(table):
            hint = ""
            if len(shape) == 2 and shape[1] == table[1]:
                hint = f" (an adapter for a resized model? resize the model's embedding to {shape[0]} rows first)"
            raise PeftFormatError(
                f"{weights_path}: tensor {key} claims shape {shape}: not a LoRA weight, and larger "
                f"than the embedding's {table}{hint}; not read"
            )
    tensors = _read_tensors(weights_path)
    _, expert_values = moe_peft.split_tensors(
        model, targets, {k: tensors.pop(k) for k in expert_keys}, str(weights_path), PeftFormatError
    )
    tensors = {moe_peft.router_key(k): v for k, v in tensors.items()}
    rows = read_token_tensors(
        model,
        config,
        tensors,
        lora_targets=targets,
        weights_path=weights_path,
        config_path=directory / ADAPTER_CONFIG,
        error=PeftFormatError,
    )
    if unexpected := [key for key in others if key in tensors]:
        raise PeftFormatError(f"{weights_path}: unexpected tensor {unexpected[0]} (not a LoRA weight)")
    values: dict[str, dict[str, np.ndarray]] = {}
    for path, target in targets.items():
        if path in expert_values:
            continue
        module, r_max = linears[path], target.max_rank
        lead = (len(target.ranks),) if target.stacked else ()
        values[path] = {
            "lora_A": np.zeros(lead + (r_max, module.in_features), np.float32),
            "lora_B": np.zeros(lead + (module.out_features, r_max), np.float32),
        }
        if config.use_dora:
            values[path]["lora_magnitude_vector"] = np.zeros(lead + (module.out_features,), np.float32)
        for i, r in enumerate(target.ranks):
            if r == 0:
                continue
            fields = {field: tensors[key] for field, key in by_layer[(path, i if target.stacked else None)].items()}
            index = (i,) if target.stacked else ()
            values[path]["lora_A"][index][:r] = fields["lora_A"]
            values[path]["lora_B"][index][:, :r] = fields["lora_B"]
            if config.use_dora:
                values[path]["lora_magnitude_vector"][index] = fields["lora_magnitude_vector"]
    if outside:
        trained = sum(key.endswith("lora_B.weight") and bool(np.any(tensors[key])) for key in outside)
        log.warning(
            "%s: %d adapter tensors of the vision tower / projector are not loaded (%d of their lora_B non-zero): this "
            "package runs Gemma 3's text decoder only, whose outputs they do not change; an adapter saved from here "
            "will not carry them (PEFT then starts them at B = 0)",
            weights_path,
            len(outside),
            trained,
        )
    init = read_adapter_config_dict(directory).get("init_lora_weights", True)
    if _changes_base(init):
        if expert_values:
            raise PeftFormatError(
                f"{directory / ADAPTER_CONFIG}: init_lora_weights={init!r} changed the base "
                f"model's experts; such adapters on experts are not supported"
            )
        config, values = _as_plain_lora(model, config, values, init.lower(), directory / ADAPTER_CONFIG)
    values.update(expert_values)
    for path, fields in rows.items():  # trained embedding rows, resized tables (convert.peft_tokens)
        values.setdefault(path, {}).update(fields)
    return config, values


def _text_only(exclude: Any) -> str:
    """`exclude_modules` for an adapter of Gemma 3's image-text model that PEFT applies to its text decoder alone:
    the config's own exclusions (a list's names as PEFT matches them, a regex as it is) or the vision tower and the
    projector, whose q/k/v projections (and all-linear's fc1, fc2, out_proj) a list of names would reach too."""
    parts = [f"(?:{exclude})"] if isinstance(exclude, str) else [rf"(?:.*\.)?{re.escape(e)}" for e in exclude or ()]
    return "|".join([*parts, r"model\.(?:vision_tower|multi_modal_projector)(?:\..*)?"])


def _initial_adapter(w: jax.Array, r: int, scaling: float, init: str) -> tuple[np.ndarray, np.ndarray]:
    """(A0 [r, in], B0 [out, r]): the adapter PEFT's `pissa_init` / `olora_init` make from the base weight
    w [out, in] (float32, as PEFT computes them): PiSSA the top-r singular triplets, A0 = sqrt(S / scaling) Vh,
    B0 = U sqrt(S / scaling); OLoRA the first r columns of Q and rows of R of w = QR. Either way the base becomes
    w - scaling B0 A0, whatever signs the decomposition picks."""
    if init == "pissa":
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s[:r] / scaling)
        a0, b0 = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    else:
        q, rr = jnp.linalg.qr(w)
        a0, b0 = rr[:r], q[:, :r]
    return np.asarray(a0, np.float32), np.asarray(b0, np.float32)


def _as_plain_lora(
    model: DecoderLM, config: LoraConfig, values: dict[str, dict], init: str, where: Path
) -> tuple[LoraConfig, dict[str, dict]]:
    """A PiSSA / OLoRA adapter (A, B at rank r, for the base w - scaling B0 A0 that PEFT makes from `model`'s base
    weights when it loads the adapter) as the plain LoRA PEFT's conversion (`path_initial_model_for_weight_conversion`)
    writes for the unchanged base: rank 2r, A' = [A; A0], B' = [B, -B0], lora_alpha (and alpha_pattern) doubled (times
    sqrt 2 with rsLoRA), so that each layer's scaling is unchanged. Same outputs as PEFT, without changing the base.

    PEFT initializes both from 16-bit weights (PiSSA refuses 4-bit ones, OLoRA re-quantizes the residual base), so a
    4-bit base is refused."""
    linears = {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, QLinear)}
    if quantized := sorted(path for path in values if linears[path].is_quantized):
        raise PeftFormatError(
            f"{where}: init_lora_weights={init!r} on a 4-bit base ({quantized[0]}, ...): PEFT builds this adapter's "
            f"base from 16-bit weights, which a 4-bit model no longer has; load the base unquantized (quantization="
            f"None; --quant none; model.quant: none), or {_CONVERSION}"
        )
    alpha = 2**0.5 if config.use_rslora else 2
    plain = dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=alpha * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: alpha * v for k, v in config.alpha_pattern.items()},
    )
    targets, doubled = target_layers(model, config), target_layers(model, plain)
    out: dict[str, dict] = {}
    for path, target in targets.items():
        assert doubled[path].ranks == tuple(2 * r for r in target.ranks), path  # PEFT's conversion, layer by layer
        assert np.allclose(doubled[path].scalings(plain.use_rslora), target.scalings(config.use_rslora)), path
        lead = (len(target.ranks),) if target.stacked else ()
        module, r_max = linears[path], 2 * target.max_rank
        a = np.zeros(lead + (r_max, module.in_features), np.float32)
        b = np.zeros(lead + (module.out_features, r_max), np.float32)
        for i, (r, scaling) in enumerate(zip(target.ranks, target.scalings(config.use_rslora), strict=True)):
            if r == 0:
                continue
            index = (i,) if target.stacked else ()
            base = (layer_of(module, i) if target.stacked else module).dense_weight(jnp.float32)
            a0, b0 = _initial_adapter(base, r, scaling, init)
            a[index][:r], a[index][r : 2 * r] = values[path]["lora_A"][index][:r], a0
            b[index][:, :r], b[index][:, r : 2 * r] = values[path]["lora_B"][index][:, :r], -b0
        out[path] = {"lora_A": a, "lora_B": b}
    return plain, out


def load_peft_adapter(model: DecoderLM, directory: str | os.PathLike) -> LoraConfig:
    """Adds the adapters of a PEFT directory to `model` (which must have none yet; ValueError otherwise) on the
    layers its config selects by PEFT's rules, each at its rank, after `read_peft_adapter` has checked all of it:
    a bad adapter (PeftFormatError) leaves the model unchanged. Returns the adapter's LoraConfig."""
    if _adapted(model):
        raise ValueError("the model already has LoRA adapters")
    config, values = read_peft_adapter(model, directory)
    apply_lora(model, dataclasses.replace(config, init_lora_weights=True), rngs=nnx.Rngs(0))
    adapted = _adapted(model)
    rows = {path: {f: v for f, v in fields.items() if not f.startswith("lora_")} for path, fields in values.items()}
    set_token_values(model, {path: fields for path, fields in rows.items() if fields})
    for path, fields in values.items():
        for field, value in fields.items():
            if not field.startswith("lora_"):
                continue
            getattr(adapted[path].lora, field).set_value(jnp.asarray(value))
    return config
