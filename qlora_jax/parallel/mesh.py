"""Device meshes and the just-in-time weight gather of a step traced for one (FSDP).

A mesh has two axes: `data` (pure data parallelism: weights replicated) and `fsdp` (fully sharded data
parallelism: weights split M ways, gathered one layer at a time). Batches are split over both (data x fsdp rows).

The model is traced for the mesh of JAX's own context (`jax.set_mesh(mesh)` around a call or a jitted function;
`qlora_jax.train.step` sets it inside its steps), the one jit sees and keys its cache on: nothing here keeps state
of its own (`context_mesh`). Under it each weight is constrained to be replicated where it is used (`gathered`):
XLA all-gathers each layer's slice inside the scan body, so no device ever holds more than its 1/M of the base
model plus the layer in flight; the gradients of sharded adapters are reduce-scattered back. The 4-bit matmuls
(custom calls XLA cannot partition) run per device on their rows (`local_matmul`; flash attention likewise, in
`qlora_jax.models.attention`).
How each array is placed is `qlora_jax.sharding`'s rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA",
    "FSDP",
    "BATCH_AXES",
    "mesh_shape",
    "make_mesh",
    "mesh_size",
    "replicated",
    "context_mesh",
    "gathered",
    "gathers_weights",
    "gathered_matmul",
    "local_matmul",
]

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """(data, fsdp) with a -1 replaced by what the other leaves of `device_count`; the product must match."""
    for name, n in (("data", data), ("fsdp", fsdp)):
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{name} must be a positive number of devices or -1 (the rest), got {n}")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data and fsdp can be -1")
    known = data if fsdp == -1 else fsdp
    if data == -1 or fsdp == -1:
        if device_count % known:
            raise ValueError(f"mesh: {device_count} devices do not divide by {known}")
        data, fsdp = (device_count // fsdp, fsdp) if data == -1 else (data, device_count // data)
    if data * fsdp != device_count:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {device_count}")
    return data, fsdp


def make_mesh(data: int = 1, fsdp: int = -1, *, devices: list[Any] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes); -1: the rest of the devices.

    The axes are Auto (sharding propagation by XLA), whatever `jax.make_mesh`'s default axis type is.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(shape, BATCH_AXES, axis_types=auto, devices=devices)


def mesh_size(mesh: Mesh | AbstractMesh | None, axis: str | tuple[str, ...] = BATCH_AXES) -> int:
    """Devices along `axis` (or the product over several axes); 1 without a mesh."""
    if mesh is None:
        return 1
    axes = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def context_mesh() -> AbstractMesh | None:
    """The mesh the model is traced for: JAX's context mesh (`jax.set_mesh`, or `use_abstract_mesh` inside a
    traced function; what jit keys its cache on), or None without one or inside a `shard_map` over the batch axes
    (there each device's arrays are its own: nothing to gather, nothing to split).

    Raises ValueError for a context mesh without the axes `data` and `fsdp`, or with either of Explicit type
    (`make_mesh` makes them Auto: sharding propagation by XLA, which the model relies on).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    missing = [a for a in BATCH_AXES if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"qlora_jax computes on a mesh with axes {BATCH_AXES} (qlora_jax.parallel.mesh.make_mesh); the context "
            f"mesh (jax.set_mesh) has axes {mesh.axis_names}"
        )
    if any(a in mesh.manual_axes for a in BATCH_AXES):
        return None
    if any(a in mesh.explicit_axes for a in BATCH_AXES):
        raise ValueError(
            f"qlora_jax computes on a mesh whose axes {BATCH_AXES} are of type Auto (qlora_jax.parallel.mesh."
            f"make_mesh, or jax.make_mesh(..., axis_types=(AxisType.Auto,) * 2)); the context mesh's are "
            f"{mesh.axis_types}"
        )
    return mesh


def gathers_weights() -> bool:
    """Whether weights traced now are gathered (under a context mesh with fsdp > 1)."""
    return mesh_size(context_mesh(), FSDP) > 1


def gathered(x: Any) -> Any:
    """x (an array or a pytree) constrained to be whole on every device: an all-gather of an fsdp-sharded weight,
    just in time; unchanged without a context mesh (`context_mesh`) or when nothing is sharded."""
    mesh = context_mesh()
    if x is None or mesh_size(mesh, FSDP) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def gathered_matmul(fn: Callable[..., jax.Array], x: jax.Array, weight: Any) -> jax.Array:
    """fn(x, gathered(weight)) per device (`local_matmul`), keeping only the weight's shard for the backward pass.

    The 4-bit matmul's backward needs its weight; kept gathered, every layer's would stay alive from the forward
    to the backward pass (the whole model, when layers are not rematerialized). A checkpoint around gather and
    matmul makes the backward pass gather again instead, as FSDP does.
    """
    if not gathers_weights():
        return local_matmul(fn, x, weight)
    return jax.checkpoint(lambda x, w: local_matmul(fn, x, gathered(w)))(x, weight)


def local_matmul(fn: Callable[..., jax.Array], x: jax.Array, weight: Any) -> jax.Array:
    """fn(x, weight) run per device on its rows of x (axis 0, split over data x fsdp), with the weight whole.

    XLA cannot partition a Pallas kernel (a custom call): left to itself it would gather every device's rows and
    compute the whole batch everywhere. Under a context mesh (`context_mesh`), `shard_map` makes each device run
    the kernel on its own rows. Without one, or when the rows do not divide, fn(x, weight) as is.
    """
    mesh = context_mesh()
    n = mesh_size(mesh)
    if mesh is None or n == 1 or x.ndim < 2 or x.shape[0] % n:
        return fn(x, weight)
    rows = P(BATCH_AXES)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, P()), out_specs=rows, check_vma=False)(x, weight)
