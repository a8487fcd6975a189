"""Adapters onto a model: `apply_lora` (PEFT's initialization, on the layers PEFT's rules select) and
`trainable_parameters` (PEFT's count of what trains)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.layers import ExpertLoRA, LoRA, dora_weight_norm, dropout_key_id
from qlora_jax.lora.targets import ModuleTargets, target_layers
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.nn import Frozen, QLinear
from qlora_jax.tokens import TrainableTokens, TrainedCopy, apply_trainable_rows, check_trainable_rows

__all__ = ["apply_lora", "trainable_parameters"]


def _initial_expert_adapter(
    key: jax.Array, module: QExperts, config: LoraConfig, r: jax.Array, rank: int
) -> tuple[jax.Array, jax.Array]:
    """(A [E, rank, in], B [E, out, rank]) of one layer, rows / columns past r zero: PEFT's ParamWrapper init, its
    nn.Linear(in, E r) A Kaiming-uniform (U(-1/sqrt(in), 1/sqrt(in))) or N(0, 1/r), B zero."""
    key_a, key_b = jax.random.split(key)
    e, fan_in, fan_out = module.num_experts, module.in_features, module.parts * module.out_features
    if config.init_lora_weights == "gaussian":
        a = jax.random.normal(key_a, (e, rank, fan_in), jnp.float32) / jnp.maximum(r, 1)
    else:
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(key_a, (e, rank, fan_in), jnp.float32, -bound, bound)
    if config.init_lora_weights is False:
        b = jax.random.normal(key_b, (e, fan_out, rank), jnp.float32) * 0.02
    else:
        b = jnp.zeros((e, fan_out, rank), jnp.float32)
    used = jnp.arange(rank) < r
    return jnp.where(used[:, None], a, 0), jnp.where(used[None, :], b, 0)


def _check_parameter_target(name: str, config: LoraConfig) -> None:
    """PEFT's ParamWrapper (the adapter of a parameter: experts, router) refuses dropout and DoRA."""
    for field, bad in (("lora_dropout", config.lora_dropout != 0), ("use_dora", config.use_dora)):
        if bad:
            raise ValueError(
                f"{field}={getattr(config, field)!r} is not supported on {name}, a mixture of "
                f"experts' parameter (PEFT's lora.ParamWrapper refuses it too)"
            )


def _initial_adapter(
    key: jax.Array, layer: QLinear, config: LoraConfig, r: jax.Array, rank: int, scaling: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(A [rank, in], B [out, rank], magnitude [out] or None) for one (unstacked) layer whose adapter has rank
    r <= rank: rows / columns past r are zero (r = 0: no adapter, all zero), float32."""
    key_a, key_b = jax.random.split(key)
    fan_in, fan_out = layer.in_features, layer.out_features
    if config.init_lora_weights == "gaussian":  # PEFT: nn.init.normal_(A, std=1 / r)
        a = jax.random.normal(key_a, (rank, fan_in), jnp.float32) / jnp.maximum(r, 1)
    else:  # PEFT's default: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(key_a, (rank, fan_in), jnp.float32, -bound, bound)
    if config.init_lora_weights is False:
        b = jax.random.normal(key_b, (fan_out, rank), jnp.float32) * 0.02
    else:
        b = jnp.zeros((fan_out, rank), jnp.float32)
    used = jnp.arange(rank) < r  # [rank]: zero padding in both A and B adds nothing and gets zero gradient
    a, b = jnp.where(used[:, None], a, 0), jnp.where(used[None, :], b, 0)
    magnitude = None
    if config.use_dora:
        magnitude = dora_weight_norm(layer.dense_weight(jnp.float32), scaling * (b @ a))
    return a, b, magnitude


def _stacked(module: QLinear) -> int | None:
    """The layer count if this QLinear's variables carry a leading layer axis, else None."""
    value = module.packed[...] if module.is_quantized else module.weight[...]
    return value.shape[0] if value.ndim == (2 if module.is_quantized else 3) else None


def apply_lora(
    model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, targets: Mapping[str, ModuleTargets] | None = None
) -> list[str]:
    """Adds an adapter to every targeted QLinear (4-bit or dense) of `model`, in place, on the layers PEFT's rules
    select (`target_layers`), each layer with its own rank and alpha; `targets` replaces that selection.

    The embedding's (and an untied head's) rows named by `trainable_token_indices` / `modules_to_save` become
    trainable as PEFT makes them (`qlora_jax.tokens.apply_trainable_rows`).

    Returns the adapted module paths. Raises ValueError if nothing matches, if the selection names a module that
    is not a linear layer (or a tied lm_head), or if the model already has adapters.
    """
    if config.init_lora_weights == "loftq":
        raise ValueError("init_lora_weights='loftq' needs the 16-bit weights: use lora.loftq_initialize(...)")
    targets = target_layers(model, config) if targets is None else dict(targets)
    rows = config.trainable_token_indices is not None or config.modules_to_save is not None
    if rows:  # checked before the model changes
        check_trainable_rows(model, config.trainable_token_indices, config.modules_to_save, lora_targets=targets)
    modules = dict(nnx.iter_graph(model))
    for name, target in targets.items():
        module = modules[tuple(name.split("."))]
        if module.lora is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        key, rank = rngs.params(), target.max_rank
        ranks = jnp.asarray(target.ranks, jnp.int32)
        scalings = jnp.asarray(target.scalings(config.use_rslora), jnp.float32)
        if isinstance(module, QExperts | TopKRouter):
            _check_parameter_target(name, config)
        if isinstance(module, QExperts):
            a, b = jax.vmap(lambda k, r, n=rank, m=module: _initial_expert_adapter(k, m, config, r, n))(
                jax.random.split(key, len(target.ranks)), ranks
            )
            module.lora = ExpertLoRA(a, b, scaling=scalings, ranks=target.ranks)
            continue
        if not target.stacked:
            a, b, m = _initial_adapter(key, module, config, ranks[0], rank, scalings[0])
            scaling = scalings[0]
        else:
            graphdef, state = nnx.split(module)
            a, b, m = jax.vmap(
                lambda k, st, r, s, g=graphdef, n=rank: _initial_adapter(k, nnx.merge(g, st), config, r, n, s)
            )(jax.random.split(key, len(target.ranks)), state, ranks, scalings)
            scaling = scalings
        module.lora = LoRA(
            a, b, m, scaling=scaling, ranks=target.ranks, dropout=config.lora_dropout, key_id=dropout_key_id(name)
        )
    if rows:
        apply_trainable_rows(model, config.trainable_token_indices, config.modules_to_save)
    return list(targets)


def trainable_parameters(model: nnx.Module, *, verbose: bool = True) -> tuple[int, int]:
    """(trainable, total) parameter counts, printed like PEFT's `print_trainable_parameters`.

    Adapters count their layers' own ranks (not the zero padding of a stacked module, nor layers without one);
    4-bit weights count their original elements (as PEFT counts a Linear4bit's), not their bytes.
    """
    trainable = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRA):
            fan_in, fan_out = module.lora_A[...].shape[-1], module.lora_B[...].shape[-2]
            dora = fan_out if module.lora_magnitude_vector is not None else 0
            trainable += sum(r * (fan_in + fan_out) + dora for r in module.ranks if r)
        elif isinstance(module, ExpertLoRA):
            (experts, _, fan_in), fan_out = module.lora_A[...].shape[-3:], module.lora_B[...].shape[-2]
            trainable += sum(experts * r * (fan_in + fan_out) for r in module.ranks if r)
        elif isinstance(module, TrainableTokens | TrainedCopy):
            trainable += sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.LoRAParam)))
    frozen = sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen)))
    quantized = sum(
        m.in_features * m.out_features * (_stacked(m) or 1)
        for _, m in nnx.iter_graph(model)
        if isinstance(m, QLinear) and m.is_quantized
    ) + sum(
        math.prod(m.packed[...].shape[:-1]) * m.in_features * m.out_features
        for _, m in nnx.iter_graph(model)
        if isinstance(m, QExperts) and m.is_quantized
    )
    total = trainable + frozen + quantized
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total
