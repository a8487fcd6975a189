"""Device meshes, the sharding rule for a QLoRA model, and the just-in-time weight gather (FSDP).

A mesh has two axes: `data` (pure data parallelism: weights replicated) and `fsdp` (fully sharded data
parallelism: weights split M ways, gathered one layer at a time). Batches are split over both (data x fsdp rows).

The rule (`param_shardings`), for every array of the model, adapters and optimizer state:

- The leading [num_layers] axis of the stacked layers is never split (the layer scan slices it).
- A 4-bit weight's buffers split along their last (block) axis, over `fsdp`, all or none: the packed codes, the
  absmax (codes) and the nested absmax of device k are those of the same contiguous run of whole quantization
  blocks, and of whole double-quantization blocks. That needs `blocks % (M * dq_blocksize) == 0` (without double
  quantization, `blocks % M == 0`); a weight that does not divide is replicated whole. The offset (one float32 a
  weight) is replicated.
- Every other array (embeddings, norms, dense linears, LoRA A and B, DoRA magnitudes) splits over `fsdp` along its
  largest axis that M divides (not the layer axis; ties: the last such axis), or is replicated if none does.
- Optimizer moments take the sharding of the parameter they belong to; counters and scalars are replicated.
- Nothing is split over `data`.

Inside a jitted step traced under `compute_mesh(mesh)`, each weight is constrained to be replicated where it is
used (`gathered`): XLA all-gathers each layer's slice inside the scan body, so no device ever holds more than
its 1/M of the base model plus the layer in flight; the gradients of sharded adapters are reduce-scattered back.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
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
    "batch_sharding",
    "param_shardings",
    "optimizer_shardings",
    "shard_bytes",
    "compute_mesh",
    "current_mesh",
    "gathered",
    "gathers_weights",
    "gathered_matmul",
    "local_matmul",
]

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
QUANT_BUFFERS = ("packed", "absmax", "nested_absmax", "offset")


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


def batch_sharding(mesh: Mesh, *, axis: int = 1) -> NamedSharding:
    """Batches split by rows over data x fsdp: axis 1 of the step's [accum, micro, T] arrays (0 for [B, T])."""
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES))


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None) != "value")


def _dense_axis(shape: tuple[int, ...], first: int, m: int) -> int | None:
    """The largest axis (from `first`) that m divides; ties go to the last one."""
    candidates = [(shape[a], a) for a in range(first, len(shape)) if shape[a] % m == 0 and shape[a] >= m]
    return max(candidates)[1] if candidates else None


def _quantized_modules(leaves: list[tuple[tuple[str, ...], Any]], m: int, dq_blocksize: int) -> dict:
    """Module path -> whether its 4-bit buffers split over M devices in whole (double-)quantization blocks."""
    modules: dict[tuple[str, ...], dict[str, Any]] = {}
    for names, leaf in leaves:
        if names and names[-1] in QUANT_BUFFERS:
            modules.setdefault(names[:-1], {})[names[-1]] = leaf
    decisions = {}
    for module, buffers in modules.items():
        if "packed" not in buffers or "absmax" not in buffers:
            continue  # not a 4-bit weight (a module that happens to have a field of that name)
        blocks = buffers["absmax"].shape[-1]
        group = dq_blocksize if buffers.get("nested_absmax") is not None else 1
        decisions[module] = m > 1 and blocks % (m * group) == 0
    return decisions


def param_shardings(tree: Any, mesh: Mesh, *, dq_blocksize: int = 256) -> Any:
    """NamedShardings for every array of `tree` (an nnx State of the model, its adapters or its base; arrays or
    ShapeDtypeStructs) by the rule of the module docstring. `dq_blocksize`: the model's double-quantization block.
    """
    m = mesh_size(mesh, FSDP)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [(_names(path), leaf) for path, leaf in flat]
    quantized = _quantized_modules(leaves, m, dq_blocksize)
    out = []
    for names, leaf in leaves:
        shape = tuple(np.shape(leaf))
        stacked = names[:2] == ("model", "layers")
        spec: list[Any] = [None] * len(shape)
        if names and names[-1] in QUANT_BUFFERS and names[:-1] in quantized:
            if quantized[names[:-1]] and names[-1] != "offset":
                spec[-1] = FSDP
        elif m > 1 and (axis := _dense_axis(shape, 1 if stacked else 0, m)) is not None:
            spec[axis] = FSDP
        out.append(NamedSharding(mesh, P(*spec)))
    return jax.tree_util.tree_unflatten(treedef, out)


def optimizer_shardings(optimizer: Any, opt_state: Any, lora_shardings: Any, mesh: Mesh) -> Any:
    """The optimizer state's shardings: each moment as its parameter, every other leaf (counts) replicated."""
    return optax.tree_map_params(
        optimizer, lambda _, s: s, opt_state, lora_shardings, transform_non_params=lambda _: replicated(mesh)
    )


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) placed by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shape = sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


_context = threading.local()


@contextlib.contextmanager
def compute_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Traces the model for `mesh`: weights gathered where used, 4-bit matmuls run per device on their rows."""
    previous = getattr(_context, "mesh", None)
    _context.mesh = mesh
    try:
        yield
    finally:
        _context.mesh = previous


def current_mesh() -> Mesh | None:
    return getattr(_context, "mesh", None)


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
