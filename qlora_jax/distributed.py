"""Multi-process (multi-host) JAX, started from the environment a launcher sets; and which rows are whose.

One process runs per host (or per GPU); every process runs the same program, sees every device of the job in
`jax.devices()`, and feeds only its own (addressable) devices. `initialize_from_environment` connects them:

- SLURM (`srun`, one task per GPU): SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID and SLURM_LOCALID are set and
  SLURM_NTASKS > 1; JAX's own SLURM detection does the rest (the coordinator is the first node of the step, each
  process takes the GPU numbered SLURM_LOCALID).
- Any launcher: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.

Single-process runs (none of these set, or one process) do nothing. See docs/scaling.md for launch recipes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax

__all__ = ["distributed_settings", "initialize_from_environment", "is_primary", "local_rows"]


def distributed_settings(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize` that `env` asks for, or None (one process).

    {} means "let JAX detect the cluster" (SLURM); explicit variables give the coordinator, count and rank.
    """
    env = os.environ if env is None else env
    if "JAX_COORDINATOR_ADDRESS" in env or "JAX_NUM_PROCESSES" in env:
        missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"multi-process launch: {', '.join(missing)} not set (set all three, or none)")
        num, rank = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        if not 0 <= rank < num:
            raise ValueError(f"JAX_PROCESS_ID={rank} must be in [0, JAX_NUM_PROCESSES={num})")
        if num == 1:
            return None
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": num, "process_id": rank}
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:  # what JAX's SlurmCluster needs
        return {}
    return None


def initialize_from_environment(env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` if the environment describes a multi-process job (once; before any other
    JAX call). Returns whether this is a multi-process run."""
    settings = distributed_settings(env)
    if settings is None:
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**settings)
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def local_rows(indices: Iterable[tuple[slice, ...]], axis: int, size: int) -> slice:
    """The contiguous rows along `axis` (of `size`) that the given device indices cover: one process's rows.

    `indices` are the index tuples of the process's devices (`sharding.addressable_devices_indices_map(shape)`);
    devices replicating the same rows repeat them. A process must own one contiguous run (true of meshes built by
    `qlora_jax.mesh.make_mesh`, whose devices are ordered by process).
    """
    spans = sorted({(s.start or 0, size if s.stop is None else s.stop) for s in (ix[axis] for ix in indices)})
    if not spans:
        raise ValueError("no devices: this process holds no rows")
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise ValueError(f"this process's rows are not contiguous along axis {axis}: {spans}")
    return slice(spans[0][0], spans[-1][1])
