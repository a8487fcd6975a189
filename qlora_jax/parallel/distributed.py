"""Multi-process (multi-host) JAX, started from the environment a launcher sets; and which rows are whose.

One process runs per host (or per GPU); every process runs the same program, sees every device of the job in
`jax.devices()`, and feeds only its own (addressable) devices. `initialize_from_environment` connects them:

- SLURM (`srun`, one task per GPU): SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID and SLURM_LOCALID are set and
  SLURM_NTASKS > 1; JAX's own SLURM detection does the rest (the coordinator is the first node of the step, each
  process takes the GPU numbered SLURM_LOCALID).
- Any launcher: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.

Single-process runs (none of these set, or one process) do nothing. See docs/scaling.md for launch recipes.

A start that fails (a process that never comes, a wrong address) is one `DistributedError` line naming the
process, the coordinator and the timeout, not the coordination service's log. `publish` / `wait_for` pass short
texts between processes through the coordination service's key-value store (no collective, so a process that
fails before a collective can still tell the others why, and they stop with its message instead of waiting).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from qlora_jax.errors import QloraJaxError

__all__ = [
    "DistributedError",
    "distributed_settings",
    "initialize_from_environment",
    "is_primary",
    "local_rows",
    "publish",
    "wait_for",
    "together",
    "describe_failure",
]


class DistributedError(QloraJaxError, RuntimeError):
    """A multi-process run that cannot start, or whose processes lost each other."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def describe_failure(error: BaseException) -> str | None:
    """One line for a runtime error of a multi-process run (the coordination service's or a collective's), by
    kind; None if it is not one of those."""
    text = str(error)
    where = f"process {jax.process_index()} of {jax.process_count()}"
    if "Gloo" in text or "gloo" in text or "Connection closed by peer" in text or "NCCL" in text:
        return (
            f"{where}: lost another process during a collective ({_first_line(error)}): a process of the job "
            "died or was stopped; its own log says why"
        )
    if "heartbeat" in text or "unhealthy" in text or "CoordinationService" in text or "coordination" in text:
        return (
            f"{where}: the coordination service reports a failed process ({_first_line(error)}); its own log says why"
        )
    return None


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


def initialize_from_environment(
    env: Mapping[str, str] | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
    shutdown_timeout_seconds: int = 300,
) -> bool:
    """Calls `jax.distributed.initialize` if the environment describes a multi-process job (once; before any other
    JAX call), with JAX's timeouts (seconds): how long processes wait for each other to start, after how long
    without a heartbeat a process counts as dead, how long the end waits for the others. Returns whether this is
    a multi-process run. Raises DistributedError (one line) if the processes do not come together in time."""
    settings = distributed_settings(env)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    coordinator = settings.get("coordinator_address", "from SLURM")
    rank = settings.get("process_id", os.environ.get("SLURM_PROCID", "?"))
    count = settings.get("num_processes", os.environ.get("SLURM_NTASKS", "?"))
    # If a process never comes, JAX ends the others with its own fatal log (an abort) once the timeout has passed:
    # this line says beforehand what they wait for, and for how long.
    print(
        f"process {rank} of {count}: waiting up to {initialization_timeout} s for all {count} processes at the "
        f"coordinator {coordinator} (mesh.initialization_timeout)",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(
            **settings,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            shutdown_timeout_seconds=shutdown_timeout_seconds,
        )
    except Exception as e:  # the coordination service's errors (XlaRuntimeError, RuntimeError): their log is long
        _forget_failed_start()
        raise DistributedError(
            f"process {rank} of {count}: the processes did not come together at the coordinator {coordinator} "
            f"within {initialization_timeout} s ({_first_line(e)}): start every process with the same "
            "coordinator address and process count, each with its own process id, and process 0 reachable at "
            "that address; mesh.initialization_timeout is how long they wait for each other"
        ) from None
    return True


def _forget_failed_start() -> None:
    """Drops the client and service of a failed `jax.distributed.initialize`, so that JAX's exit handler does not
    shut them down again (and print their error once more)."""
    from jax._src import distributed

    state = distributed.global_state
    for name in ("preemption_sync_manager", "client", "service"):
        part = getattr(state, name, None)
        if part is not None:
            try:
                part.shutdown()
            except Exception:  # noqa: BLE001 -- already in an error state: it only complains
                pass
            setattr(state, name, None)


def _client() -> Any:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise DistributedError("not a multi-process run: jax.distributed is not initialized")
    return client


def publish(key: str, value: str) -> None:
    """Sets `key` to `value` in the job's key-value store (every process may read it; each key is set once)."""
    _client().key_value_set(key, value)


def together(name: str, timeout_s: float) -> bool:
    """Whether every process reaches the barrier `name` within `timeout_s` (False also if the job is broken)."""
    try:
        _client().wait_at_barrier(name, int(timeout_s * 1000))
    except Exception:  # noqa: BLE001 -- DEADLINE_EXCEEDED, or a coordination service that is gone
        return False
    return True


def wait_for(key: str, timeout_s: float, *, what: str) -> str:
    """The value of `key` once some process has published it; DistributedError naming `what` after `timeout_s`."""
    try:
        return _client().blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:  # DEADLINE_EXCEEDED from the coordination service
        raise DistributedError(
            f"process {jax.process_index()} of {jax.process_count()}: no word of {what} within "
            f"{timeout_s:.0f} s ({_first_line(e)}); that process's log says why"
        ) from None


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def local_rows(indices: Iterable[tuple[slice, ...]], axis: int, size: int) -> slice:
    """The contiguous rows along `axis` (of `size`) that the given device indices cover: one process's rows.

    `indices` are the index tuples of the process's devices (`sharding.addressable_devices_indices_map(shape)`);
    devices replicating the same rows repeat them. A process must own one contiguous run (true of meshes built by
    `qlora_jax.parallel.mesh.make_mesh`, whose devices are ordered by process).
    """
    spans = sorted({(s.start or 0, size if s.stop is None else s.stop) for s in (ix[axis] for ix in indices)})
    if not spans:
        raise ValueError("no devices: this process holds no rows")
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise ValueError(f"this process's rows are not contiguous along axis {axis}: {spans}")
    return slice(spans[0][0], spans[-1][1])
