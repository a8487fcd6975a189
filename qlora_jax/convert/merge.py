"""Merged exports: base + adapters folded into one checkpoint that transformers loads without PEFT.

W' = dequantize(W) + scaling * B @ A (`LoRA.delta_weight`; DoRA: m * (W + scaling B A) / ||W + scaling B A||, row-wise,
as PEFT's `DoraLinearLayer` merges it), written layer by layer as 16-bit safetensors (`merge_and_save`) or
re-quantized to bitsandbytes 4-bit (`quant=...`), so host memory stays near one layer's tensors whatever the model's
size. Trained embedding rows (PEFT's trainable tokens, modules_to_save: `qlora_jax.tokens`) are written into the
(resized) embedding and output head, as PEFT's merge writes them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.convert import bnb, moe_io
from qlora_jax.convert.safetensors_io import SafetensorsReader, write_sharded
from qlora_jax.convert.state_map import all_keys, model_slots, variable_at
from qlora_jax.lora import dora_weight_norm
from qlora_jax.models import DecoderLM
from qlora_jax.models.generation_config import GENERATION_CONFIG
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.models.names import hf_module_name, layer_name
from qlora_jax.nn import QLinear
from qlora_jax.quant import QuantConfig, dequantize, quantize

__all__ = ["merged_weight", "merged_tensors", "merge_and_save", "layer_of"]

log = logging.getLogger(__name__)


def layer_of(module: nnx.Module, layer: int) -> nnx.Module:
    """A copy of a stacked module (every variable with a leading [num_layers] axis) holding only layer `layer`."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


def merged_weight(module: QLinear | TopKRouter | QExperts, layer: int | None = None) -> jax.Array:
    """The float32 weight [out, in] of one (layer of a) linear, its adapter folded in: `QLinear.dense_weight` +
    `LoRA.delta_weight`, scaled row-wise to DoRA's magnitude if the adapter has one. A mixture of experts' router
    likewise; its experts' [E, out, in] with `ExpertLoRA.delta_weight` (docs/moe.md)."""
    if layer is not None:
        module = layer_of(module, layer)
    w = module.dense_weight(jnp.float32)
    if getattr(module, "trainable_rows", None) is not None:  # an output head's trained rows (qlora_jax.tokens)
        w = module.trainable_rows.merged(w)
    lora = module.lora
    if lora is None or lora.ranks[layer or 0] == 0:  # no adapter on this layer (docs/lora.md)
        return w
    delta = lora.delta_weight()
    if getattr(lora, "lora_magnitude_vector", None) is None:  # (an ExpertLoRA has none)
        return w + delta
    magnitude = lora.lora_magnitude_vector[...]  # [out]
    return (w + delta) * (magnitude / dora_weight_norm(w, delta))[:, None]


def merged_tensors(
    model: DecoderLM, dtype: Any = jnp.bfloat16, quant: QuantConfig | None = None, *, experts: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, array) for every tensor of the merged model, one layer at a time.

    With `quant`, linear weights that `quant.skip_modules` does not keep (matched per layer, `QuantConfig.skips`) are
    re-quantized and written as bitsandbytes 4-bit (a mixture of experts' experts and router stay 16-bit, as
    transformers 5 with bitsandbytes keeps them). `experts=False` leaves a mixture of experts' expert tensors out
    (for a writer of another layout: GGUF's).
    """
    dtype = jnp.dtype(dtype)
    # a mixture of experts' experts, 16-bit whatever `quant` says: the one way transformers 5 loads them
    if experts:
        yield from moe_io.expert_tensors(model, merged_weight, dtype)
    for key, slot, layer in all_keys(model_slots(model), model.config.num_layers):
        module = variable_at(model, slot.module_path)
        key = moe_io.checkpoint_name(model.config, key)
        if isinstance(module, QLinear | TopKRouter) and key.endswith(".weight"):
            w = merged_weight(module, layer).astype(dtype)
            # one layer's name, as transformers matches skip_modules against it
            module_name = hf_module_name(layer_name(".".join(slot.module_path), layer), model.config.text_model_path)
            if quant is not None and isinstance(module, QLinear) and not quant.skips(module_name):
                qt = quantize(w, quant)
                yield from bnb.to_state_dict(qt, key).items()
            else:
                yield key, np.asarray(w)
        else:
            (path,) = slot.paths
            index = () if layer is None else (layer,)
            value = variable_at(model, path).get_value()[index]
            if getattr(module, "trainable_rows", None) is not None:  # the embedding's trained rows
                value = module.trainable_rows.merged(value)
            yield key, np.asarray(value.astype(dtype))


def merge_and_save(
    model: DecoderLM,
    directory: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    quant: QuantConfig | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    source: str | os.PathLike | None = None,
) -> list[Path]:
    """Writes the merged model: safetensors (sharded past max_shard_size) + config.json (+ the checkpoint's
    generation_config.json, so that transformers stops and samples as the base model did; + tokenizer files).

    dtype: what the merged weights are stored in. quant: re-quantize the linear weights to bitsandbytes 4-bit (the
    config then carries a quantization_config, with `dtype` as `bnb_4bit_compute_dtype`, and transformers loads
    it with bitsandbytes); None writes 16 bits.

    A text decoder loaded from Gemma 3's image-text checkpoint (`ModelConfig.multimodal_config`) is written back as
    that model, Gemma3ForConditionalGeneration, given the checkpoint it was loaded from as `source`: its config.json
    and its vision tower and projector tensors as they were (kept unquantized by a 4-bit merge), the merged text
    decoder under the checkpoint's own names. Without `source` it is written as the text model alone
    (Gemma3ForCausalLM, model_type gemma3_text), and a warning says so.
    """
    multimodal = model.config.multimodal_config
    if multimodal is not None and source is None:
        log.warning(
            "merging the text decoder of a Gemma 3 image-text model without its checkpoint (source=): "
            "writing a text-only Gemma3ForCausalLM (model_type gemma3_text) to %s",
            directory,
        )
    tensors = merged_tensors(model, dtype, quant)
    if multimodal is not None and source is not None:
        hf = {k: v for k, v in multimodal.items() if k != "quantization_config"}
        hf["text_config"] = {k: v for k, v in hf["text_config"].items() if k != "quantization_config"}
        for key in ("dtype", *(("torch_dtype",) if "torch_dtype" in hf["text_config"] else ())):
            hf["text_config"][key] = jnp.dtype(dtype).name
        reader = SafetensorsReader(source)
        tensors = _with_vision_tower(tensors, reader, keep_4bit=quant is not None, dtype=jnp.dtype(dtype))
        skip = [] if quant is None else [*quant.skip_modules, *_dense_outside_text(reader)]
    else:
        hf = model.config.to_hf_config()
        skip = [] if quant is None else list(quant.skip_modules)
    hf["torch_dtype"] = hf["dtype"] = jnp.dtype(dtype).name
    if quant is not None:
        hf["quantization_config"] = bnb.quantization_config(
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
            compute_dtype=jnp.dtype(dtype).name,
            skip_modules=skip or None,
        )
    extra = {"config.json": json.dumps(hf, indent=2)}
    if model.config.generation is not None:
        extra[GENERATION_CONFIG] = model.config.generation.to_json()
    files = write_sharded(directory, tensors, max_shard_size=max_shard_size, extra_files=extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return files


# Gemma 3's image-text model: the prefixes of the tensors outside its text decoder (vision tower, projector) in a
# checkpoint, in either layout transformers has written, and their modules' names at run time.
_NOT_TEXT_TENSORS = {
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "model.vision_tower.": "model.vision_tower.",
    "model.multi_modal_projector.": "model.multi_modal_projector.",
}


def _outside_text(source: SafetensorsReader) -> tuple[list[str], set[str]]:
    """(the keys of `source` outside the text decoder, the names of its 4-bit weights among them)."""
    keys = [k for k in source.keys() if k.startswith(tuple(_NOT_TEXT_TENSORS))]
    return keys, set(bnb.quantized_weight_prefixes(keys))


def _dense_outside_text(source: SafetensorsReader) -> list[str]:
    """The `llm_int8_skip_modules` patterns that keep the vision tower and projector as `source` stores them: the
    two modules whole when nothing there is 4-bit, else each weight stored in 16 bits by its module's name."""
    keys, quantized = _outside_text(source)
    if not quantized:
        return ["model.vision_tower", "model.multi_modal_projector"] if keys else []
    names = []
    for key in keys:
        if key.endswith(".weight") and key not in quantized:
            prefix = next(p for p in _NOT_TEXT_TENSORS if key.startswith(p))
            names.append(_NOT_TEXT_TENSORS[prefix] + key[len(prefix) : -len(".weight")])
    return names


def _with_vision_tower(
    text: Iterator[tuple[str, np.ndarray]], source: SafetensorsReader, *, keep_4bit: bool, dtype: Any
) -> Iterator[tuple[str, np.ndarray]]:
    """The merged text decoder's tensors under the image-text checkpoint's names (`language_model.model.*`, as
    transformers 5 saves it, or `model.language_model.*`, whichever `source` uses), then `source`'s vision tower
    and projector tensors as they are stored (its 4-bit weights dequantized to `dtype` unless `keep_4bit`)."""
    keys, quantized = _outside_text(source)
    runtime = any(k.startswith("model.language_model.") for k in source.keys())
    model_prefix, head = (
        ("model.language_model.", "lm_head.") if runtime else ("language_model.model.", "language_model.lm_head.")
    )
    for key, array in text:
        yield (
            (model_prefix + key[len("model.") :] if key.startswith("model.") else head + key[len("lm_head.") :]),
            array,
        )
    owned = {k for k in keys for w in quantized if k == w or k.startswith(w + ".")}
    for key in keys:
        if keep_4bit or key not in owned:
            yield key, source.tensor(key, check_finite=key not in quantized)
        elif key in quantized:
            stats = {k: source.tensor(k) for k in keys if k.startswith(key + ".")}
            qt = bnb.from_state_dict({key: source.tensor(key, check_finite=False), **stats}, key)
            yield key, np.asarray(dequantize(qt, dtype))
