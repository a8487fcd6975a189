"""A run on a device mesh: where the train state, the base weights and the batches live.

    mesh = make_mesh(data=2, fsdp=4)
    shardings = step_shardings(mesh, lora, base, optimizer, dq_blocksize=256)
    lora, base = place(lora, shardings.state.lora), place(base, shardings.base)
    state = TrainState.create(lora, optimizer, shardings=shardings.state)
    step = make_train_step(graphdef, optimizer, shardings=shardings)
    state, metrics = step(state, base, global_batch(host_batch, shardings.batch), key)

The sharding rule itself is `qlora_jax.sharding` (documented there and in docs/scaling.md); `place` and
`global_batch` (how the arrays get there) are `qlora_jax.parallel.placement`'s. What stays here needs the train
package: a run config's mesh (`configured_mesh`) and the shardings of a `TrainState` (`step_shardings`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from qlora_jax.parallel.mesh import make_mesh, replicated
from qlora_jax.sharding import batch_sharding, optimizer_shardings, param_shardings
from qlora_jax.train.config import ConfigFieldError, TrainConfig, check_batch_divides
from qlora_jax.train.step import TrainState

__all__ = ["StepShardings", "configured_mesh", "step_shardings"]


def configured_mesh(config: TrainConfig) -> Mesh | None:
    """The config's `mesh` over every device of the job, or None for a single-device run. A clear error where jax
    has too few devices for it (with how to simulate them on CPU) or the batch does not split over it."""
    if config.mesh.is_single_device:
        return None
    try:
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    except ValueError as e:
        raise ConfigFieldError(
            f"{e} (jax.devices(): {jax.device_count()} {jax.default_backend()} devices; on CPU, start Python with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate N)"
        ) from e
    check_batch_divides(config, mesh.size)
    return mesh


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Shardings of a train step's arguments: `state` is a TrainState of NamedShardings (the optimizer state in
    pinned host memory if offloaded), `base` the frozen weights', `batch` [accum, micro, T] and `eval_batch` [B, T]
    arrays (rows split over data x fsdp), `replicated` scalars and keys."""

    mesh: Mesh
    state: TrainState
    base: Any
    batch: NamedSharding
    eval_batch: NamedSharding
    replicated: NamedSharding
    expert_parallel: bool = False  # a mixture of experts' experts split over fsdp by expert (docs/moe.md)


def step_shardings(
    mesh: Mesh,
    lora: Any,
    base: Any,
    optimizer: optax.GradientTransformation,
    *,
    dq_blocksize: int = 256,
    offload: bool = False,
    expert_parallel: bool = False,
) -> StepShardings:
    """The placement of a run on `mesh` (`lora`, `base`: the split model, arrays or ShapeDtypeStructs);
    `expert_parallel`: a mixture of experts' experts split by expert over fsdp and computed where they are."""
    lora_shardings = param_shardings(lora, mesh, dq_blocksize=dq_blocksize, expert_parallel=expert_parallel)
    opt_state = jax.eval_shape(optimizer.init, lora)
    opt_shardings = optimizer_shardings(optimizer, opt_state, lora_shardings, mesh)
    if offload:
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    state = TrainState(replicated(mesh), lora_shardings, opt_shardings)
    base_shardings = param_shardings(base, mesh, dq_blocksize=dq_blocksize, expert_parallel=expert_parallel)
    return StepShardings(
        mesh,
        state,
        base_shardings,
        batch_sharding(mesh, axis=1),
        batch_sharding(mesh, axis=0),
        replicated(mesh),
        expert_parallel,
    )
