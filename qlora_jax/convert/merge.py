"""Merged exports: base + adapters folded into one checkpoint that transformers loads without PEFT.

W' = dequantize(W) + scaling * B @ A (`LoRA.delta_weight`; DoRA: m * (W + scaling B A) / ||W + scaling B A||, row-wise,
as PEFT's `DoraLinearLayer` merges it), written layer by layer as 16-bit safetensors (`merge_and_save`) or
re-quantized to bitsandbytes 4-bit (`quant=...`), so host memory stays near one layer's tensors whatever the model's
size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.convert import bnb, moe_io
from qlora_jax.convert.safetensors_io import write_sharded
from qlora_jax.convert.state_map import all_keys, model_slots, variable_at
from qlora_jax.lora import dora_weight_norm
from qlora_jax.models import DecoderLM
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.nn import QLinear
from qlora_jax.quant import QuantConfig, quantize

__all__ = ["merged_weight", "merged_tensors", "merge_and_save"]


def _layer_of(module: nnx.Module, layer: int) -> nnx.Module:
    """A copy of a stacked module (every variable with a leading [num_layers] axis) holding only layer `layer`."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


def merged_weight(module: QLinear | TopKRouter | QExperts, layer: int | None = None) -> jax.Array:
    """The float32 weight [out, in] of one (layer of a) linear, its adapter folded in: `QLinear.dense_weight` +
    `LoRA.delta_weight`, scaled row-wise to DoRA's magnitude if the adapter has one. A mixture of experts' router
    likewise; its experts' [E, out, in] with `ExpertLoRA.delta_weight` (docs/moe.md)."""
    if layer is not None:
        module = _layer_of(module, layer)
    w = module.dense_weight(jnp.float32)
    lora = module.lora
    if lora is None or lora.ranks[layer or 0] == 0:  # no adapter on this layer (docs/lora.md)
        return w
    delta = lora.delta_weight()
    if getattr(lora, "lora_magnitude_vector", None) is None:  # (an ExpertLoRA has none)
        return w + delta
    magnitude = lora.lora_magnitude_vector[...]  # [out]
    return (w + delta) * (magnitude / dora_weight_norm(w, delta))[:, None]


def merged_tensors(model: DecoderLM, dtype: Any = jnp.bfloat16, quant: QuantConfig | None = None, *,
                   experts: bool = True) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """(transformers name, array) for every tensor of the merged model, one layer at a time.

    With `quant`, linear weights not in `quant.skip_modules` are re-quantized and written as bitsandbytes 4-bit (a
    mixture of experts' experts and router stay 16-bit, as transformers 5 with bitsandbytes keeps them).
    `experts=False` leaves a mixture of experts' expert tensors out (for a writer of another layout: GGUF's).
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
            module_name = ".".join(slot.module_path)
            if quant is not None and isinstance(module, QLinear) and not quant.skips(module_name):
                qt = quantize(w, quant_type=quant.quant_type, blocksize=quant.blocksize,
                              double_quant=quant.double_quant, dq_blocksize=quant.dq_blocksize)  # fmt: skip
                yield from bnb.to_state_dict(qt, key).items()
            else:
                yield key, np.asarray(w)
        else:
            (path,) = slot.paths
            index = () if layer is None else (layer,)
            yield key, np.asarray(variable_at(model, path).get_value()[index].astype(dtype))


def merge_and_save(
    model: DecoderLM,
    directory: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    quant: QuantConfig | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Writes the merged model: safetensors (sharded past max_shard_size) + config.json (+ tokenizer files).

    dtype: what the merged weights are stored in. quant: re-quantize the linear weights to bitsandbytes 4-bit (the
    config then carries a quantization_config, with `dtype` as `bnb_4bit_compute_dtype`, and transformers loads
    it with bitsandbytes); None writes 16 bits.
    """
    hf = model.config.to_hf_config()
    hf["torch_dtype"] = hf["dtype"] = jnp.dtype(dtype).name
    if quant is not None:
        hf["quantization_config"] = bnb.quantization_config(
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
            compute_dtype=jnp.dtype(dtype).name,
            skip_modules=list(quant.skip_modules) or None,
        )
    files = write_sharded(
        directory,
        merged_tensors(model, dtype, quant),
        max_shard_size=max_shard_size,
        extra_files={"config.json": json.dumps(hf, indent=2)},
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return files
