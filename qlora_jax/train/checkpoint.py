"""Orbax checkpoints of a run: adapters, optimizer state, step, and the data position, written atomically.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint as it was; `restore` only ever sees finished ones.

Arrays are saved as they are placed: a state sharded over a mesh is written shard by shard, each by the process
that holds it (multi-host runs need a directory every host can reach). `restore` places each array where the
target says (`shardings`, or the shardings of `like`), whatever the device count it was saved from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from qlora_jax.train.optim import to_memory
from qlora_jax.train.step import TrainState

__all__ = ["RunCheckpoints"]


class RunCheckpoints:
    """The checkpoints of one run, in `directory` (keeps the newest `keep`)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, extra: dict[str, Any]) -> Path:
        """Saves `state` and the JSON-able `extra` (data position, config) at `state.step`."""
        step = int(state.step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_savable(state)), extra=ocp.args.JsonSave(extra))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(
        self, like: TrainState, *, offload: bool = False, step: int | None = None, shardings: TrainState | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """A checkpoint (default: the latest), shaped like `like` (arrays or ShapeDtypeStructs) and placed by
        `shardings` (a TrainState of shardings; default: `like`'s own, else the first device); its optimizer state
        goes back to pinned host memory if offload."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint of step {step} (there are {self.all_steps()})")
        if shardings is None:
            first = SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or first, like)
        # restored into device memory; moved to pinned host below (if offloaded)
        targets = jax.tree.map(lambda s: s.with_memory_kind("device"), shardings)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, targets)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        state = restored["state"]
        if offload:
            state = TrainState(state.step, state.lora, to_memory(state.opt_state, "pinned_host", shardings.opt_state))
        return state, restored["extra"]

    def close(self) -> None:
        self._manager.close()


def _savable(state: TrainState) -> TrainState:
    """The state as orbax writes it: pinned-host arrays (an offloaded optimizer state) read into host numpy, or on
    a multi-host mesh, where no process holds them whole, copied to device memory shard by shard."""

    def on_device(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None or sharding.memory_kind in (None, "device"):
            return x
        if x.is_fully_addressable:
            return jax.device_get(x)
        return jax.device_put(x, sharding.with_memory_kind("device"))

    return jax.tree.map(on_device, state)
