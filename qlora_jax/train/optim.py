"""The optimizer: AdamW over the LoRA parameters only, with warmup + schedule and gradient clipping, and the
option to keep its state in pinned host memory (the JAX counterpart of bitsandbytes' paged optimizers).

Only the adapters are ever handed to optax (`nnx.state(model, nnx.LoRAParam)`), so no moment, count or mask
exists for a base weight: the base is not just masked out, it is absent from the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from jax.sharding import SingleDeviceSharding

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimConfig",
    "learning_rate_schedule",
    "make_optimizer",
    "memory_placement",
    "to_memory",
]

OPTIMIZERS = ("adamw",)
SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer of the adapters (the `optim` section of a training config is this class).

    Attributes:
      optimizer: "adamw" (optax.adamw: decoupled weight decay, as torch.optim.AdamW).
      learning_rate: the peak learning rate, after warmup; schedule: "constant", "linear" or "cosine" decay from
        it to end_lr_fraction * learning_rate over the steps after warmup_steps (linear warmup from 0).
      weight_decay, beta1, beta2, eps: AdamW's.
      max_grad_norm: clip the adapters' gradients to this global norm first; None: no clipping.
      offload: keep the optimizer state in pinned host memory; it visits the device only inside the step.

    Raises ValueError for an unknown optimizer or schedule, a learning rate <= 0, negative warmup, a
    max_grad_norm <= 0, an end_lr_fraction outside [0, 1], beta1 or beta2 outside [0, 1), eps <= 0 or a negative
    weight_decay (NaN included).

    >>> config = OptimConfig(learning_rate=1e-3, warmup_steps=10)
    >>> optimizer = make_optimizer(config, total_steps=110)  # an optax.GradientTransformation
    >>> schedule = learning_rate_schedule(config, total_steps=110)
    >>> [round(float(schedule(step)), 6) for step in (0, 5, 10, 60, 110)]
    [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """

    optimizer: str = "adamw"
    learning_rate: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    offload: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.end_lr_fraction <= 1:
            raise ValueError(f"end_lr_fraction must be in [0, 1], got {self.end_lr_fraction}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        for name in ("beta1", "beta2"):  # a moment that never decays (1) or grows (> 1, < 0) is no average
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:  # 0: a zero second moment divides by zero
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:  # negative: the weights are pushed away from zero
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
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


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with `config`'s schedule over `total_steps` optimizer steps, after clipping by global norm."""
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
