"""Orbax checkpoints of a run: adapters, optimizer state, step, and the data position, written atomically.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint as it was; `restore` only ever sees finished ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

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
        host_state = jax.device_get(state)  # pinned-host or device arrays alike become numpy
        args = ocp.args.Composite(state=ocp.args.StandardSave(host_state), extra=ocp.args.JsonSave(extra))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(
        self, like: TrainState, *, offload: bool = False, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """A checkpoint (default: the latest), shaped like `like` (arrays or ShapeDtypeStructs); its optimizer state
        goes back to pinned host memory if offload."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint of step {step} (there are {self.all_steps()})")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        state = jax.tree.map(jax.numpy.asarray, restored["state"])
        if offload:
            state = TrainState(state.step, state.lora, to_memory(state.opt_state, "pinned_host"))
        return state, restored["extra"]

    def close(self) -> None:
        self._manager.close()
