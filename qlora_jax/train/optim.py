"""The optimizer: AdamW over the LoRA parameters only, with warmup + schedule and gradient clipping, and the
option to keep its state in pinned host memory (the JAX counterpart of bitsandbytes' paged optimizers).

Only the adapters are ever handed to optax (`nnx.state(model, nnx.LoRAParam)`), so no moment, count or mask
exists for a base weight: the base is not just masked out, it is absent from the optimizer.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import SingleDeviceSharding

from qlora_jax.train.config import OptimSection

__all__ = ["learning_rate_schedule", "make_optimizer", "memory_placement", "to_memory"]


def learning_rate_schedule(config: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, linear or cosine decay to end_lr_fraction * learning_rate."""
    peak, warmup = config.learning_rate, min(config.warmup_steps, total_steps)
    end = peak * config.end_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: OptimSection, total_steps: int) -> optax.GradientTransformation:
    # identity() keeps the state's structure the same with and without clipping, so a run may turn clipping on
    # (or off) when it resumes from a checkpoint
    chain = [optax.identity() if config.max_grad_norm is None else optax.clip_by_global_norm(config.max_grad_norm)]
    chain.append(
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.beta1,
            b2=config.beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*chain)


def memory_placement(tree: Any, memory_kind: str, shardings: Any = None) -> Any:
    """Shardings in `memory_kind` ("device" or "pinned_host") matching `tree`'s arrays: `shardings` (a mesh
    placement of the same tree) in that memory, or without them, the first device."""
    if shardings is not None:
        return jax.tree.map(lambda s: s.with_memory_kind(memory_kind), shardings)
    device = jax.devices()[0]
    return jax.tree.map(lambda _: SingleDeviceSharding(device, memory_kind=memory_kind), tree)


def to_memory(tree: Any, memory_kind: str, shardings: Any = None) -> Any:
    """Moves every array of `tree` to `memory_kind`, keeping `shardings` if given (works eagerly and inside jit)."""
    return jax.device_put(tree, memory_placement(tree, memory_kind, shardings))
