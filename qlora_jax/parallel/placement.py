"""Arrays put on their shardings, and a global batch assembled from the rows each process holds.

    lora, base = place(lora, shardings.state.lora), place(base, shardings.base)
    batch = global_batch(host_batch, shardings.batch)

The shardings come from the rule of `qlora_jax.sharding` (a train step's, all together:
`qlora_jax.train.parallel.step_shardings`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from qlora_jax.parallel.distributed import local_rows

__all__ = ["place", "global_batch"]


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the whole array; each fills its own devices' shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays moved to their shardings (on every process of a multi-process run)."""
    return jax.tree.map(_put, tree, shardings)


def global_batch(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from the host batch every process holds: each process hands over only the rows of its own
    devices (`jax.make_array_from_process_local_data`); rows are split along the sharding's batch axis."""
    axis = next(i for i, names in enumerate(sharding.spec) if names is not None)
    out = {}
    for name, array in arrays.items():
        indices = sharding.addressable_devices_indices_map(array.shape).values()
        rows = local_rows(indices, axis, array.shape[axis])
        local = array[(slice(None),) * axis + (rows,)]
        out[name] = jax.make_array_from_process_local_data(sharding, local, array.shape)
    return out
