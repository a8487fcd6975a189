"""Hugging Face checkpoints in and out: `load_pretrained` (safetensors, sharded, bitsandbytes 4-bit, GGUF) and
`save_pretrained` (safetensors + config.json that transformers loads).

Loading builds the model abstractly (no weights allocated), then streams the checkpoint one tensor at a time:
each linear weight is quantized as it arrives and written into preallocated 4-bit host buffers, so peak host
memory stays near the 4-bit model plus one tensor in 16 bits. Pre-quantized bitsandbytes checkpoints are
copied as they are, never re-quantized.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.convert import bnb, moe_io
from qlora_jax.convert.finite import non_finite
from qlora_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, write_sharded
from qlora_jax.convert.state_map import Slot, all_keys, model_slots, resolve, variable_at
from qlora_jax.models import DecoderLM, ModelConfig
from qlora_jax.models.config_files import is_gguf
from qlora_jax.models.generation_config import GENERATION_CONFIG, read_generation_config
from qlora_jax.models.names import LAYERS, hf_module_name, layer_name
from qlora_jax.nn import QLinear
from qlora_jax.quant import QuantConfig, QuantizedTensor, dequantize, quantize

__all__ = [
    "load_pretrained",
    "save_pretrained",
    "load_model",
    "tensor_source",
    "stored_quantization",
    "CheckpointError",
]

log = logging.getLogger(__name__)

NF4 = QuantConfig()  # QLoRA's storage: NF4, blocks of 64, double quantization, lm_head kept in 16 bits

# Tensors some checkpoints carry that the model computes itself.
_IGNORED = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")


class TensorSource(Protocol):
    """What the loader reads from: safetensors directories and GGUF files alike."""

    name: str  # for error messages

    def keys(self) -> list[str]: ...

    def tensor(self, key: str, *, check_finite: bool = True) -> np.ndarray: ...

    def shape(self, key: str) -> tuple[int, ...]: ...  # the header's claim, read without the data

    def file_of(self, key: str) -> Path: ...


def _stored_quant_config(hf: dict[str, Any], source: TensorSource, config: ModelConfig) -> QuantConfig:
    """The QuantConfig a bitsandbytes 4-bit checkpoint was written with: its format from the tensors, the modules kept
    in 16 bits from config.json's `llm_int8_skip_modules` (matched per layer as transformers matches them,
    `QuantConfig.skips`), each linear weight checked to be stored as that list says."""
    try:
        listed = bnb.stored_quant_config(hf["quantization_config"], source=f"{source.name}/config.json")
    except bnb.BnbFormatError as e:
        raise CheckpointError(str(e)) from e
    keys = source.keys()
    quantized = bnb.quantized_weight_prefixes(keys)
    if not quantized:
        raise CheckpointError(f"{source.name}: quantization_config says 4-bit but no tensor is stored in 4 bits")
    first = _read_bnb(source, quantized[0], _statistics_keys(keys, set(quantized))[quantized[0]])
    quant = QuantConfig(
        quant_type=first.quant_type,
        double_quant=first.double_quant,
        blocksize=first.blocksize,
        dq_blocksize=first.dq_blocksize or 256,
        skip_modules=listed.skip_modules,
    )
    stored_4bit, present = set(quantized), set(keys)
    all_linear = nnx.eval_shape(lambda: DecoderLM(config, quant=QuantConfig(skip_modules=()), rngs=nnx.Rngs(0)))
    for slot in model_slots(all_linear).values():
        for layer in range(config.num_layers) if slot.stacked else [None]:
            key = slot.key(layer)
            if not slot.quantized or key not in present:  # a missing tensor is reported by load_model
                continue
            skipped = quant.skips(hf_module_name(key.removesuffix(".weight"), config.text_model_path))
            if skipped == (key in stored_4bit):
                stored = "4 bits" if key in stored_4bit else "16 bits"
                rule = "keeps it in 16 bits" if skipped else "does not keep it in 16 bits"
                raise CheckpointError(
                    f"{source.file_of(key)}: {key} is stored in {stored}, but quantization_config."
                    f"llm_int8_skip_modules {list(quant.skip_modules)} {rule}: transformers would not load it either"
                )
    return quant


def _log_dense_stacks(model: DecoderLM) -> None:
    """Names the stacked modules held in 16 bits for every layer because `skip_modules` keeps some of their layers
    (an Unsloth "dynamic" 4-bit checkpoint), with what that costs over 4 bits."""
    quant, c = model.quant, model.config
    if quant is None:
        return
    for path, module in nnx.iter_graph(model.model.layers):
        if not isinstance(module, QLinear) or module.is_quantized:
            continue
        name = f"{LAYERS}.{'.'.join(str(p) for p in path)}"
        kept = [i for i in range(c.num_layers) if quant.skips(hf_module_name(layer_name(name, i), c.text_model_path))]
        if len(kept) == c.num_layers:
            continue
        shape = jax.ShapeDtypeStruct((module.out_features, module.in_features), module.param_dtype)
        four_bit = sum(
            leaf.size * leaf.dtype.itemsize
            for leaf in jax.tree.leaves(jax.eval_shape(lambda w: quantize(w, quant), shape))
        )
        dense = module.out_features * module.in_features * module.param_dtype.itemsize
        extra = (c.num_layers - len(kept)) * (dense - four_bit)
        log.warning(
            "%s: skip_modules keeps layer%s %s unquantized, so this module is held in %s for all %d layers (%s more "
            "than 4 bits for the others, whose 4-bit weights it holds dequantized)",
            name,
            "s" * (len(kept) > 1),
            ", ".join(map(str, kept)),
            module.param_dtype.name,
            c.num_layers,
            _size(extra),
        )


def _size(n: int) -> str:
    return next(
        f"{n / scale:.1f} {unit}"
        for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
        if n >= scale or unit == "B"
    )


def _statistics_keys(keys: list[str], quantized: set[str]) -> dict[str, list[str]]:
    """For each 4-bit weight name, the names of its statistics tensors (`<weight>.absmax`, ...)."""
    stats: dict[str, list[str]] = {name: [] for name in quantized}
    for key in keys:
        owner = key.split(".weight.")[0] + ".weight" if ".weight." in key else None
        if owner in stats:
            stats[owner].append(key)
    return stats


def _read_bnb(source: TensorSource, key: str, statistics: list[str]) -> QuantizedTensor:
    # the packed codes are bytes, whatever float dtype `bnb_4bit_quant_storage` lends them: no NaN check
    tensors = {key: source.tensor(key, check_finite=False)} | {k: source.tensor(k) for k in statistics}
    try:
        return bnb.from_state_dict(tensors, key)
    except bnb.BnbFormatError as e:
        raise CheckpointError(f"{source.file_of(key)}: {e}") from e


def _check_shape(slot: Slot, key: str, shape: tuple[int, ...], source: TensorSource) -> None:
    if tuple(shape) != slot.shape:
        raise CheckpointError(f"{source.file_of(key)}: tensor {key} has shape {tuple(shape)}, expected {slot.shape}")


def _float_tensor(source: TensorSource, key: str) -> np.ndarray:
    array = source.tensor(key)
    if array.dtype.kind != "f" and array.dtype != jnp.bfloat16:
        raise CheckpointError(f"{source.file_of(key)}: tensor {key} has unsupported dtype {array.dtype}")
    return array


def _cast(array: np.ndarray, dtype: Any, key: str, source: TensorSource) -> jax.Array:
    """The tensor in `dtype`; values beyond its range (float32 -> float16) are an error, not an Inf."""
    cast = jnp.asarray(array).astype(dtype)
    if not bool(jnp.isfinite(cast).all()):
        if problem := non_finite(np.asarray(array)):  # a source that does not check (readers here all do)
            raise CheckpointError(f"{source.file_of(key)}: tensor {key} {problem}")
        largest = float(np.abs(np.asarray(array, np.float32)).max())
        raise CheckpointError(
            f"{source.file_of(key)}: tensor {key} holds values up to {largest:.4g}, beyond "
            f"{jnp.dtype(dtype).name}'s range; load it in bfloat16 or float32"
        )
    return cast


def load_model(
    config: ModelConfig,
    source: TensorSource,
    *,
    quantization: QuantConfig | None,
    dtype: Any = jnp.bfloat16,
    param_dtype: Any = None,
) -> DecoderLM:
    """Builds a DecoderLM for `config` and fills it from `source`, one tensor at a time, checking every name,
    shape and dtype. 16-bit weights are quantized as they arrive (if `quantization`); bitsandbytes 4-bit weights
    are copied (or dequantized, into a dense model)."""
    param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
    abstract = nnx.eval_shape(
        lambda: DecoderLM(config, quant=quantization, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    slots = model_slots(abstract)
    buffers = {}
    for slot in slots.values():
        for path in slot.paths:
            spec = variable_at(abstract, path).get_value()
            buffers[path] = np.zeros(spec.shape, spec.dtype)
    # linear weights held in 16 bits while `quantization` stores some of their layers in 4 bits (skip_modules)
    dense_linears = (
        set()
        if quantization is None
        else {
            slot.name
            for slot in slots.values()
            if not slot.quantized
            and isinstance(variable_at(abstract, slot.module_path), QLinear)
            and slot.name.endswith(".weight")
        }
    )
    keys = source.keys()
    stored_4bit = set(bnb.quantized_weight_prefixes(keys))
    statistics = _statistics_keys(keys, stored_4bit)
    owned = {k for names in statistics.values() for k in names}
    _check_claimed_shapes(source, keys, slots, config, stored_4bit, statistics)
    filled: set[str] = set()
    experts, expert_pieces = moe_io.expert_slots(abstract), set()  # a mixture of experts' (convert/moe_io.py)
    for slot in experts.values():
        for path in slot.paths:
            spec = variable_at(abstract, path).get_value()
            buffers[path] = np.zeros(spec.shape, spec.dtype)
    for key in keys:
        if key in owned:
            continue
        if (expert := moe_io.expert_key(config, moe_io.our_name(config, key))) is not None:
            expert_pieces |= _fill_experts(
                buffers, experts, expert, key, stored_4bit, statistics, source, quantization, param_dtype
            )
            continue
        found = resolve(moe_io.our_name(config, key), slots, config.num_layers)
        if found is None:
            if key.endswith(_IGNORED) or (key == "lm_head.weight" and config.tie_word_embeddings):
                continue
            raise CheckpointError(
                f"{source.file_of(key)}: unexpected tensor {key} for a {config.model_type} model with "
                f"{config.num_layers} layers"
            )
        slot, layer = found
        index = () if layer is None else (layer,)
        if key in stored_4bit:
            qt = _read_bnb(source, key, statistics[key])
            _check_shape(slot, key, qt.shape, source)
            if slot.quantized:
                _fill_quantized(buffers, slot, index, qt, key, source)
            else:
                (path,) = slot.paths
                buffers[path][index] = np.asarray(dequantize(qt, buffers[path].dtype))
        else:
            array = _float_tensor(source, key)
            _check_shape(slot, key, array.shape, source)
            if slot.quantized:
                _fill_quantized(
                    buffers, slot, index, quantize(_cast(array, param_dtype, key, source), quantization), key, source
                )
            else:
                (path,) = slot.paths
                value = _cast(array, buffers[path].dtype, key, source)
                if slot.name in dense_linears and not quantization.skips(
                    hf_module_name(key.removesuffix(".weight"), config.text_model_path)
                ):
                    # a 4-bit layer of a stack held in 16 bits for another layer's sake: its 4-bit values
                    value = dequantize(quantize(value, quantization), value.dtype)
                buffers[path][index] = np.asarray(value)
        filled.add(key)
    expected = {key for key, _, _ in all_keys(slots, config.num_layers)}
    filled = {moe_io.our_name(config, key) for key in filled}
    missing = sorted(expected - filled) + moe_io.missing_pieces(config, experts, expert_pieces)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source.name}: missing tensors {missing[:5]}{more}")
    for path in list(buffers):
        variable_at(abstract, path).set_value(jnp.asarray(buffers.pop(path)))  # frees each host buffer in turn
    return abstract


def _fill_experts(buffers, experts, expert, key, stored_4bit, statistics, source, quantization, param_dtype) -> set:
    """One checkpoint tensor of expert weights into the model's buffers (`convert.moe_io`)."""
    slot = experts.get(expert.projection)
    if slot is None:
        raise CheckpointError(f"{source.file_of(key)}: unexpected tensor {key} (this model has no such experts)")
    if key in stored_4bit:
        value = _read_bnb(source, key, statistics[key])
    else:
        value = _float_tensor(source, key)
    if slot.quantized and isinstance(value, QuantizedTensor) and value.quant_type != quantization.quant_type:
        raise CheckpointError(
            f"{source.file_of(key)}: 4-bit tensor {key} is {value.quant_type}, the model's "
            f"experts are {quantization.quant_type}"
        )
    try:
        return set(
            moe_io.fill_expert(
                buffers,
                slot,
                expert,
                value,
                quantization=quantization,
                param_dtype=param_dtype,
                cast=lambda a, dtype: _cast(a, dtype, key, source),
                where=f"{source.file_of(key)}: tensor {key}",
            )
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _check_claimed_shapes(
    source: TensorSource,
    keys: list[str],
    slots: dict[str, Slot],
    config: ModelConfig,
    stored_4bit: set[str],
    statistics: dict[str, list[str]],
) -> None:
    """Every tensor's shape as its file's header claims it, against the model, before any data is read: a file
    whose known tensor claims a huge shape is refused here, naming it, instead of being read into memory. (A mixture
    of experts' expert tensors are checked as they are read: `convert.moe_io.fill_expert`.)"""
    owner = {stat: weight for weight, stats in statistics.items() for stat in stats}
    for key in keys:
        found = resolve(moe_io.our_name(config, owner.get(key, key)), slots, config.num_layers)
        if found is None:
            continue  # an unexpected or ignored tensor: the loader names it (or skips it) without reading it
        slot, _ = found
        size = math.prod(slot.shape)
        shape = tuple(source.shape(key))
        if key in owner:  # 4-bit statistics (absmax, quant map, quant state): at most one value per weight value
            if math.prod(shape) > max(size, 4096):
                raise CheckpointError(
                    f"{source.file_of(key)}: tensor {key} claims shape {shape}, more values than "
                    f"its weight's {slot.shape}; not read"
                )
        elif key in stored_4bit:  # packed codes: two a byte, in 1-, 2-, 4- or 8-byte elements (bnb_4bit_quant_storage)
            if (size + 1) // 2 not in {math.prod(shape) * width for width in (1, 2, 4, 8)}:
                raise CheckpointError(
                    f"{source.file_of(key)}: 4-bit tensor {key} claims shape {shape}, not the "
                    f"{(size + 1) // 2} bytes of a {slot.shape} weight; not read"
                )
        else:
            _check_shape(slot, key, shape, source)


def _fill_quantized(buffers, slot: Slot, index, qt: QuantizedTensor, key: str, source: TensorSource) -> None:
    for path in slot.paths:
        value = np.asarray(getattr(qt, path[-1]))
        target = buffers[path]
        if value.shape != target.shape[len(index) :] or value.dtype != target.dtype:
            raise CheckpointError(
                f"{source.file_of(key)}: 4-bit tensor {key}.{path[-1]} is {value.dtype}{list(value.shape)}, "
                f"expected {target.dtype}{list(target.shape[len(index) :])} (another blocksize or quant type?)"
            )
        target[index] = value


class _GGUFSource:
    """A GGUF file as a TensorSource (tensors dequantized to float32 one at a time, in HF names)."""

    def __init__(self, path: Path):
        from qlora_jax.convert.gguf import read_gguf

        self.checkpoint = read_gguf(path)
        self.path, self.name = path, str(path)

    def keys(self) -> list[str]:
        return list(self.checkpoint.tensor_names)

    def tensor(self, key: str, *, check_finite: bool = True) -> np.ndarray:
        return self.checkpoint.tensor(key)  # GGUF tensors are always checked (and never hold packed 4-bit codes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.checkpoint.shape(key)

    def file_of(self, key: str) -> Path:
        return self.path


class _LanguageModelOnly:
    """A Gemma 3 image-text checkpoint seen as its text decoder: `language_model.model.*` (or
    `model.language_model.*`) renamed to `model.*`, the vision tower and projector left out."""

    _RENAMES = (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    )
    _DROPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

    def __init__(self, source: SafetensorsReader):
        self.source, self.name = source, source.name
        self._original: dict[str, str] = {}
        for key in source.keys():
            if key.startswith(self._DROPPED):
                continue
            renamed = next((new + key[len(old) :] for old, new in self._RENAMES if key.startswith(old)), key)
            self._original[renamed] = key

    def keys(self) -> list[str]:
        return list(self._original)

    def tensor(self, key: str, *, check_finite: bool = True) -> np.ndarray:
        return self.source.tensor(self._original[key], check_finite=check_finite)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._original[key])

    def file_of(self, key: str) -> Path:
        return self.source.file_of(self._original[key])


def tensor_source(path: str | os.PathLike) -> TensorSource:
    """The 16-bit tensors of a checkpoint, by transformers name, one at a time (safetensors directory or GGUF)."""
    path = Path(path)
    if is_gguf(path):
        return _GGUFSource(path)
    reader = SafetensorsReader(path)
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get(
        "model_type"
    ) == "gemma3":
        return _LanguageModelOnly(reader)
    return reader


def stored_quantization(path: str | os.PathLike) -> QuantConfig | None:
    """The QuantConfig of a bitsandbytes 4-bit checkpoint directory (what `load_pretrained` keeps it in, whatever
    `quantization` says, unless None), read from its config.json and the quant state of one 4-bit tensor; None for
    any other checkpoint. Checks every linear weight's storage against `llm_int8_skip_modules`."""
    path = Path(path)
    if is_gguf(path) or not (path / "config.json").is_file():
        return None
    config = ModelConfig.from_file(path / "config.json")
    hf = dict(config.hf_config)
    if (hf.get("quantization_config") or {}).get("quant_method") != "bitsandbytes":
        return None
    return _stored_quant_config(hf, tensor_source(path), config)


def load_pretrained(
    path: str | os.PathLike,
    *,
    quantization: QuantConfig | None = NF4,
    dtype: Any = jnp.bfloat16,
    param_dtype: Any = None,
) -> tuple[DecoderLM, ModelConfig]:
    """Loads a transformers model directory (config.json + safetensors) or a GGUF file.

    Args:
      path: a directory with config.json and model.safetensors (or shards + index), or a .gguf file.
      quantization: how to store the linear weights (None: dense, in param_dtype). A bitsandbytes 4-bit
        checkpoint keeps its stored layout whatever this says, unless it is None (then it is dequantized).
      dtype: compute dtype; param_dtype: storage dtype of dense weights, embeddings and norms (default: dtype).

    Returns (model, config); `config.generation` holds the checkpoint's generation defaults
    (generation_config.json, or a GGUF's end ids). Errors name the file and tensor: unknown model_type (with the
    supported list), missing or truncated shards, unexpected or missing tensors, shape or dtype mismatches.

    >>> import tempfile
    >>> config = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=128, hidden_size=64,
    ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     files = save_pretrained(DecoderLM(config, rngs=nnx.Rngs(0)), directory)  # 16-bit safetensors
    ...     model, config = load_pretrained(directory)  # quantized to NF4 as each tensor arrives
    >>> [f.name for f in files], config.num_layers, model.model.layers.mlp.up_proj.is_quantized
    (['model.safetensors', 'config.json'], 2, True)
    """
    path = Path(path)
    if is_gguf(path):
        source = _GGUFSource(path)
        config = ModelConfig.from_hf_config(source.checkpoint.config, source=str(path))
        config = dataclasses.replace(config, generation=read_generation_config(path))
        return load_model(config, source, quantization=quantization, dtype=dtype, param_dtype=param_dtype), config
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory or a .gguf file")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    config = ModelConfig.from_file(path / "config.json")
    config = dataclasses.replace(config, generation=read_generation_config(path))
    reader = tensor_source(path)
    hf = dict(config.hf_config)
    if (hf.get("quantization_config") or {}).get("quant_method") == "bitsandbytes" and quantization is not None:
        quantization = _stored_quant_config(hf, reader, config)
    model = load_model(config, reader, quantization=quantization, dtype=dtype, param_dtype=param_dtype)
    _log_dense_stacks(model)
    return model, config


def _checkpoint_tensors(model: DecoderLM, *, dequantize_weights: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every base-model tensor, in transformers' names, layer by layer (a mixture of experts'
    expert weights in 16 bits, the one way transformers loads them: `convert.moe_io`)."""
    slots, q = model_slots(model), model.quant
    dtype = model.model.embed_tokens.weight.get_value().dtype
    yield from moe_io.expert_tensors(
        model, lambda module, layer: moe_io.layer_module(module, layer).dense_weight(jnp.float32), dtype
    )
    for key, slot, layer in all_keys(slots, model.config.num_layers):
        key = moe_io.checkpoint_name(model.config, key)
        index = () if layer is None else (layer,)
        if slot.quantized:
            linear = variable_at(model, slot.module_path)
            qt = jax.tree.map(lambda a, index=index: a[index] if index else a, linear.quantized_tensor())
            if dequantize_weights:
                yield key, np.asarray(dequantize(qt))
            else:
                yield from bnb.to_state_dict(qt, key).items()
            continue
        (path,) = slot.paths
        array = np.asarray(variable_at(model, path).get_value()[index])
        linear = isinstance(variable_at(model, slot.module_path), QLinear) and key.endswith(".weight")
        name = hf_module_name(key.removesuffix(".weight"), model.config.text_model_path)
        if linear and q is not None and not dequantize_weights and not q.skips(name):
            # a layer of a stack held in 16 bits for another layer's sake (`skip_modules`): 4-bit again, as the
            # quantization_config says (from its dequantized values: the same codes, double-quant statistics aside)
            qt = quantize(array, q)
            yield from bnb.to_state_dict(qt, key).items()
        else:
            yield key, array


def save_pretrained(
    model: DecoderLM,
    directory: str | os.PathLike,
    *,
    dequantize_weights: bool = False,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Writes the base model as transformers saves it: safetensors (sharded past max_shard_size) + config.json
    (+ generation_config.json, when the model was loaded with one).

    A text decoder loaded from Gemma 3's image-text checkpoint is written as the text model alone (a warning says
    so). A 4-bit model is written in bitsandbytes' 4-bit format with a `quantization_config` (transformers loads it
    with bitsandbytes; `bnb_4bit_compute_dtype` is the model's compute dtype), or dequantized to its dtype with
    `dequantize_weights=True`. LoRA adapters are not part of
    the base model: see `qlora_jax.convert.peft` and `qlora_jax.convert.merge`.
    """
    config = model.config
    if config.multimodal_config is not None:
        log.warning(
            "saving the text decoder of a Gemma 3 image-text model: writing a text-only Gemma3ForCausalLM "
            "(model_type gemma3_text) to %s; merge_and_save(..., source=) writes the image-text model",
            directory,
        )
    hf = config.to_hf_config()
    hf["torch_dtype"] = hf["dtype"] = jnp.dtype(model.model.embed_tokens.weight.get_value().dtype).name
    if model.quant is not None and not dequantize_weights:
        q = model.quant
        hf["quantization_config"] = bnb.quantization_config(
            quant_type=q.quant_type,
            double_quant=q.double_quant,
            compute_dtype=model.dtype.name,
            skip_modules=list(q.skip_modules) or None,
        )
    tensors = _checkpoint_tensors(model, dequantize_weights=dequantize_weights)
    extra = {"config.json": json.dumps(hf, indent=2)}
    if config.generation is not None:
        extra[GENERATION_CONFIG] = config.generation.to_json()
    return write_sharded(directory, tensors, max_shard_size=max_shard_size, extra_files=extra)
