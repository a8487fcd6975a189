"""The model a training config describes: its quantization, how it computes, and an abstract (weightless) copy
with adapters."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from qlora_jax.convert.hf import read_model_config
from qlora_jax.lora import apply_lora
from qlora_jax.models import ComputeOptions, DecoderLM
from qlora_jax.quant import QuantConfig
from qlora_jax.train.config import TrainConfig, resolve_package_path

__all__ = ["quant_config", "compute_options", "abstract_model"]


def quant_config(config: TrainConfig) -> QuantConfig | None:
    """How the run stores its base weights (None: a dense base)."""
    m = config.model
    if m.quant == "none":
        return None
    return QuantConfig(quant_type=m.quant, double_quant=m.double_quant, blocksize=m.blocksize,
                       compute_dtype=jnp.dtype(m.dtype))  # fmt: skip


def compute_options(config: TrainConfig) -> ComputeOptions:
    """How the run's model computes (train.remat, train.attention, train.attention_block): what its jitted steps
    compile in. `train.remat: auto` must be resolved first (`qlora_jax.train.plan.resolve_remat`)."""
    t = config.train
    if t.remat == "auto":
        raise ValueError("train.remat: auto is resolved by qlora_jax.train.plan.resolve_remat before compiling")
    return ComputeOptions(remat=t.remat, attention=t.attention, attention_block=t.attention_block)


def abstract_model(config: TrainConfig, *, num_layers: int | None = None) -> DecoderLM:
    """The run's model with adapters, every array a ShapeDtypeStruct: nothing is read but the model's config.

    It has the structure of the trained model (LoftQ-initialized adapters have the same shapes), so checkpoints
    restore into it and memory plans compile against it. `num_layers` cuts the model to its first layers (or
    repeats its layer pattern, for a model shallower than that).
    """
    model_config = read_model_config(resolve_package_path(config.model.path))
    if num_layers is not None:  # cut (or, for a model shallower than the planner's probes, repeated) in depth
        types = model_config.layer_types
        layer_types = tuple(types[i % len(types)] for i in range(num_layers)) if types else ()
        model_config = dataclasses.replace(model_config, num_layers=num_layers, layer_types=layer_types)
    dtype = jnp.dtype(config.model.dtype)

    def build() -> DecoderLM:
        model = DecoderLM(model_config, quant=quant_config(config), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        apply_lora(model, config.lora, rngs=nnx.Rngs(config.train.seed))
        return model

    return nnx.eval_shape(build)
