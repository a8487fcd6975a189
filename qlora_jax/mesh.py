"""Device meshes and the just-in-time weight gather of a step traced for one (FSDP).

A mesh has two axes: `data` (pure data parallelism: weights replicated) and `fsdp` (fully sharded data
parallelism: weights split M ways, gathered one layer at a time). Batches are split over both (data x fsdp rows).

Inside a jitted step traced under `compute_mesh(mesh)`, each weight is constrained to be replicated where it is
used (`gathered`): XLA all-gathers each layer's slice inside the scan body, so no device ever holds more than
its 1/M of the base model plus the layer in flight; the gradients of sharded adapters are reduce-scattered back.
How each array is placed is `qlora_jax.sharding`'s rule.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA",
    "FSDP",
    "BATCH_AXES",
    "mesh_shape",
    "make_mesh",
    "mesh_size",
    "replicated",
    "compute_mesh",
    "current_mesh",
    "experts_sharded",
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


def mesh_size(mesh: Mesh | None, axis: str | tuple[str, ...] = BATCH_AXES) -> int:
    """Devices along `axis` (or the product over several axes); 1 without a mesh."""
    if mesh is None:
        return 1
    axes = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_context = threading.local()


@contextlib.contextmanager
def compute_mesh(mesh: Mesh | None, *, expert_parallel: bool = False) -> Iterator[None]:
    """Traces the model for `mesh`: weights gathered where used, 4-bit matmuls run per device on their rows.
    `expert_parallel`: a mixture of experts' experts stay split over `fsdp` and compute where they are
    (`experts_sharded`; docs/moe.md)."""
    previous = getattr(_context, "mesh", None), getattr(_context, "expert_parallel", False)
    _context.mesh, _context.expert_parallel = mesh, expert_parallel
    try:
        yield
    finally:
        _context.mesh, _context.expert_parallel = previous


def current_mesh() -> Mesh | None:
    return getattr(_context, "mesh", None)


def experts_sharded() -> bool:
    """Whether a mixture of experts traced now runs expert-parallel (under `compute_mesh(..., expert_parallel=True)`
    with fsdp > 1): each device computes its own experts for the tokens of its fsdp group."""
    return getattr(_context, "expert_parallel", False) and mesh_size(current_mesh(), FSDP) > 1


def gathers_weights() -> bool:
    """Whether weights traced now are gathered (under `compute_mesh` with fsdp > 1)."""
    return mesh_size(current_mesh(), FSDP) > 1


def gathered(x: Any) -> Any:
    """x (an array or a pytree) constrained to be whole on every device: an all-gather of an fsdp-sharded weight,
    just in time; unchanged outside `compute_mesh` or when nothing is sharded."""
    if x is None or not gathers_weights():
        return x
    return jax.lax.with_sharding_constraint(x, replicated(current_mesh()))


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
    compute the whole batch everywhere. Under `compute_mesh`, `shard_map` makes each device run the kernel on
    its own rows. Outside it, or when the rows do not divide, fn(x, weight) as is.
    """
    mesh = current_mesh()
    n = mesh_size(mesh)
    if mesh is None or n == 1 or x.ndim < 2 or x.shape[0] % n:
        return fn(x, weight)
    rows = P(BATCH_AXES)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, P()), out_specs=rows, check_vma=False)(x, weight)
