"""The model a training config describes (its quantization, how it computes, an abstract weightless copy with
adapters) and the one builder of its jitted steps, `make_steps`: the run (`setup`) and the memory planner (`plan`)
both compile what it returns, so the planner never plans a step that does not run."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import optax
from flax import nnx

from qlora_jax.convert.hf import stored_quantization
from qlora_jax.kernels import KernelOptions, autotune
from qlora_jax.lora import apply_lora, target_layers
from qlora_jax.lora.targets import ModuleTargets
from qlora_jax.models import ComputeOptions, DecoderLM, ModelConfig, read_model_config
from qlora_jax.models.config_files import open_gguf
from qlora_jax.nn import QLinear
from qlora_jax.quant import QuantConfig
from qlora_jax.train.config import TrainConfig, resolve_package_path
from qlora_jax.train.loss import auto_chunk_size
from qlora_jax.train.optim import learning_rate_schedule, make_optimizer
from qlora_jax.train.step import make_eval_step, make_train_step, step_options

__all__ = [
    "Steps",
    "quant_config",
    "compute_options",
    "abstract_model",
    "base_model_name",
    "make_steps",
    "run_optimizer",
    "run_vocab_size",
    "resized",
]

log = logging.getLogger(__name__)


def quant_config(config: TrainConfig) -> QuantConfig | None:
    """How the run stores its base weights (None: a dense base): a bitsandbytes 4-bit checkpoint as it is stored
    (`load_pretrained` keeps it so: its format, and the modules its `llm_int8_skip_modules` keeps in 16 bits, which
    the memory plan then counts as 16-bit weights), any other as `model.quant`, `double_quant`, `blocksize` say."""
    m = config.model
    if m.quant == "none":
        return None
    if (stored := stored_quantization(resolve_package_path(m.path))) is not None:
        return stored
    return QuantConfig(quant_type=m.quant, double_quant=m.double_quant, blocksize=m.blocksize)


def compute_options(config: TrainConfig, *, target: str | None = None) -> ComputeOptions:
    """How the run's model computes (train.remat, train.attention, train.attention_block, train.kernels): what its
    jitted steps compile in; `target` names the GPU the choices are made for when it is not this machine's
    (`KernelOptions.target`); the kernel choices measured on this machine (`qlora-jax tune`'s cache) are read here,
    once. `train.remat: auto` must be resolved first (`qlora_jax.train.plan.resolve_remat`)."""
    t = config.train
    if t.remat == "auto":
        raise ValueError("train.remat: auto is resolved by qlora_jax.train.plan.resolve_remat before compiling")
    kernels = KernelOptions(impl=t.kernels, target=target, tuning=autotune.load_choices())
    return ComputeOptions(remat=t.remat, attention=t.attention, attention_block=t.attention_block, kernels=kernels)


def run_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The run's AdamW with its schedule over `train.steps` (the optimizer state's shapes and placement follow)."""
    return make_optimizer(config.optim, config.train.steps)


@dataclasses.dataclass(frozen=True)
class Steps:
    """A run's jitted steps and what they compile in.

    train_step: `(state, base, batch, key) -> (state, metrics)` (`make_train_step`); eval_step:
    `(lora, base, batch) -> (loss_sum, tokens)` (`make_eval_step`).
    """

    options: ComputeOptions
    chunk_size: int
    train_step: Callable
    eval_step: Callable


def make_steps(
    config: TrainConfig,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    vocab_size: int,
    shardings: Any = None,
    target: str | None = None,
) -> Steps:
    """The train and eval steps of `config` (remat resolved) for the model `graphdef`, with `optimizer`
    (`run_optimizer`); `shardings`: the mesh placement (`train.parallel.step_shardings`) or None; `target`: the GPU
    the kernel and attention choices are made for, when it is not this machine's (a deviceless plan)."""
    t = config.train
    options = step_options(compute_options(config, target=target), shardings)  # what the steps compile in
    chunk_size = t.loss_chunk_size or auto_chunk_size(vocab_size)
    train_step = make_train_step(
        graphdef,
        optimizer,
        chunk_size=chunk_size,
        options=options,
        offload_optimizer=config.optim.offload,
        learning_rate=learning_rate_schedule(config.optim, t.steps),
        shardings=shardings,
        packed_rows=config.data.packing,
        router_aux_loss_coef=t.router_aux_loss_coef,
    )
    # Not only eval rows (one example each): the divergence check scores training batches with this step too, and
    # packed rows read as one sequence would attend across their examples.
    eval_step = make_eval_step(
        graphdef, chunk_size=chunk_size, options=options, shardings=shardings, packed_rows=config.data.packing
    )
    return Steps(options, chunk_size, train_step, eval_step)


def run_vocab_size(config: TrainConfig, model_vocab: int) -> int:
    """The rows of the run's embedding: `model.resize_token_embeddings`, else the model's own."""
    return config.model.resize_token_embeddings or model_vocab


def resized(config: TrainConfig, model_config: ModelConfig) -> ModelConfig:
    """The model's config with the run's vocabulary size (`model.resize_token_embeddings`), as
    `qlora_jax.tokens.resize_token_embeddings` leaves it."""
    vocab = run_vocab_size(config, model_config.vocab_size)
    return model_config if vocab == model_config.vocab_size else dataclasses.replace(model_config, vocab_size=vocab)


def abstract_model(config: TrainConfig, *, num_layers: int | None = None) -> DecoderLM:
    """The run's model with adapters, every array a ShapeDtypeStruct: nothing is read but the model's config.

    It has the structure of the trained model (LoftQ-initialized adapters have the same shapes), so checkpoints
    restore into it and memory plans compile against it. `num_layers` cuts the model to its first layers (or
    repeats its layer pattern, for a model shallower than that).
    """
    model_config = resized(config, read_model_config(resolve_package_path(config.model.path)))
    dtype = jnp.dtype(config.model.dtype)
    quant = quant_config(config)

    def build(model_config, targets=None) -> DecoderLM:
        model = DecoderLM(model_config, quant=quant, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        apply_lora(model, config.lora, rngs=nnx.Rngs(config.train.seed), targets=targets)
        return model

    if num_layers is None:
        return nnx.eval_shape(lambda: build(model_config))
    # The adapters of the whole model, cut: a stacked module holds every layer's adapter at its largest rank
    # (docs/lora.md), so each of the first layers gets that rank, whichever layers the config selects.
    full = nnx.eval_shape(
        lambda: DecoderLM(model_config, quant=quant, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    if quant is not None:  # the cut stores each stacked module as the whole model does (skip_modules name layers)
        dense = [
            ".".join(map(str, path))
            for path, module in nnx.iter_graph(full.model.layers)
            if isinstance(module, QLinear) and not module.is_quantized
        ]
        quant = dataclasses.replace(quant, skip_modules=(*quant.skip_modules, *dense))
    alpha = config.lora.lora_alpha
    targets = {
        path: ModuleTargets((t.max_rank,) * num_layers, (alpha,) * num_layers, True) if t.stacked else t
        for path, t in target_layers(full, config.lora).items()
    }
    # Cut in depth (or, for a model shallower than the planner's probes, its layer pattern repeated).
    types = model_config.layer_types
    layer_types = tuple(types[i % len(types)] for i in range(num_layers)) if types else ()
    cut = dataclasses.replace(model_config, num_layers=num_layers, layer_types=layer_types)
    return nnx.eval_shape(lambda: build(cut, targets))


_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([\w.-]+/[\w.-]+)/?$")


def base_model_name(config: TrainConfig) -> str:
    """What a run's PEFT adapter records as `base_model_name_or_path` (what `AutoPeftModel` loads as its base):
    `model.base_model_name_or_path` if set; for a GGUF, the Hugging Face repository it was converted from when its
    metadata names one (`general.source.repo_url`, `general.source.huggingface.repository`), with a warning when
    it names none; else the model's path on this machine (`package:` paths resolved)."""
    m = config.model
    if m.base_model_name_or_path:
        return m.base_model_name_or_path
    path = resolve_package_path(m.path)
    if path.endswith(".gguf") and Path(path).is_file():
        repository = _gguf_source_repository(path)
        if repository is not None:
            return repository
        log.warning(
            "%s names no source repository (general.source.repo_url): the adapter records the file's path "
            "as its base; set model.base_model_name_or_path to the Hub id of the model",
            path,
        )
    return path


def _gguf_source_repository(path: str) -> str | None:
    """The Hub repository ("org/name") a GGUF file says it was converted from, if it says so. (Not the
    `general.base_model.*` keys: those name the model this one was fine-tuned from, not this model.)"""
    fields = open_gguf(path).fields
    for key in ("general.source.huggingface.repository", "general.source.repo_url"):
        if key in fields:
            value = str(fields[key].contents()).strip()
            match = _HUB_URL.match(value)
            if match:
                return match.group(1)
            if re.fullmatch(r"[\w.-]+/[\w.-]+", value):
                return value
    return None
