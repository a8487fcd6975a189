"""The sharding rule for a QLoRA model: where each array of the model, its adapters and optimizer state lives.

The mesh (axes `data` and `fsdp`) and the just-in-time gather inside a traced step are `qlora_jax.parallel.mesh`'s. The
rule (`param_shardings`), for every array of the model, adapters and optimizer state:

- The leading [num_layers] axis of the stacked layers (`qlora_jax.models.names.LAYERS`) is never split (the layer
  scan slices it).
- A 4-bit weight's buffers split along their last (block) axis, over `fsdp`, all or none: the packed codes, the
  absmax (codes) and the nested absmax of device k are those of the same contiguous run of whole quantization
  blocks, and of whole double-quantization blocks. That needs `blocks % (M * dq_blocksize) == 0` (without double
  quantization, `blocks % M == 0`); a weight that does not divide is replicated whole. The offset (one float32 a
  weight) is replicated.
- Every other array (embeddings, norms, dense linears, LoRA A and B, DoRA magnitudes) splits over `fsdp` along its
  largest axis that M divides (not the layer axis; ties: the last such axis), or is replicated if none does.
- Optimizer moments take the sharding of the parameter they belong to; counters and scalars are replicated.
- Nothing is split over `data`.
- Expert parallelism (`expert_parallel`): a mixture of experts' expert arrays (`mlp.experts.*`: the 4-bit buffers
  or dense weights, their adapters, hence their moments) split their expert axis over `fsdp` instead, each device
  holding whole experts, which compute where they are (`qlora_jax.models.moe`, docs/moe.md).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.models.names import is_stacked
from qlora_jax.parallel.mesh import BATCH_AXES, FSDP, mesh_size, replicated
from qlora_jax.quant import QUANT_BUFFERS

__all__ = ["batch_sharding", "param_shardings", "optimizer_shardings", "shard_bytes"]


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


_EXPERTS = ("mlp", "experts")  # a mixture of experts' expert arrays lie under this path (qlora_jax.models.moe)


def _expert_axis(names: tuple[str, ...], shape: tuple[int, ...], m: int) -> int | None:
    """The expert axis of an expert array (after the layer axis), or None for any other array; ValueError if the
    experts do not split over m devices."""
    if not any(names[i : i + 2] == _EXPERTS for i in range(len(names) - 1)):
        return None
    axis = 1 if is_stacked(names) else 0
    if len(shape) <= axis:
        return None  # a per-layer scaling
    if shape[axis] % m:
        raise ValueError(
            f"expert parallelism: {shape[axis]} experts ({'.'.join(names)}) do not split over fsdp={m} devices"
        )
    return axis


def param_shardings(tree: Any, mesh: Mesh, *, dq_blocksize: int = 256, expert_parallel: bool = False) -> Any:
    """NamedShardings for every array of `tree` (an nnx State of the model, its adapters or its base; arrays or
    ShapeDtypeStructs) by the rule of the module docstring. `dq_blocksize`: the model's double-quantization block;
    `expert_parallel`: a mixture of experts' experts split over fsdp by expert (ValueError if they do not divide).
    """
    m = mesh_size(mesh, FSDP)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [(_names(path), leaf) for path, leaf in flat]
    quantized = _quantized_modules(leaves, m, dq_blocksize)
    out = []
    for names, leaf in leaves:
        shape = tuple(np.shape(leaf))
        stacked = is_stacked(names)
        spec: list[Any] = [None] * len(shape)
        if expert_parallel and m > 1 and (axis := _expert_axis(names, shape, m)) is not None:
            spec[axis] = FSDP
        elif names and names[-1] in QUANT_BUFFERS and names[:-1] in quantized:
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
