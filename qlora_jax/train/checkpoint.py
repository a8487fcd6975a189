"""Orbax checkpoints of a run: adapters, optimizer state, step, and the data position, written atomically.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint as it was; `restore` only ever sees finished ones.

Old checkpoints (beyond `keep`) are deleted here, not by orbax: a step directory is first renamed into
`.deleting/` (one atomic rename) and only then removed, so a crash never leaves a half-deleted step among the
complete ones. On start (`RunCheckpoints(...)`), what crashes left behind (`.deleting/`, orbax's
`*.orbax-checkpoint-tmp*` directories, and step directories that miss files of a complete checkpoint, as earlier
versions could leave) is removed, with one line saying so.

Arrays are saved as they are placed: a state sharded over a mesh is written shard by shard, each by the process
that holds it (multi-host runs need a directory every host can reach). `restore` places each array where the
target says (`shardings`, or the shardings of `like`), whatever the device count it was saved from.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from qlora_jax.errors import InputError
from qlora_jax.train.optim import to_memory
from qlora_jax.train.step import TrainState

__all__ = ["RunCheckpoints", "CheckpointNotUsable", "complete_steps"]

TRASH = ".deleting"  # step directories being deleted: renamed here first, then removed
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's unfinished saves: `<step>.orbax-checkpoint-tmp-<time>`
# The metadata every complete checkpoint of ours holds (orbax's layout: `state` by StandardSave, `extra` by
# JsonSave), all written before orbax commits the step by renaming it. An interrupted `rm -r` of a step (how orbax
# deletes, and how earlier versions of this module deleted) leaves some subset of them. Only their absence counts
# as incomplete: the data files' layout varies with the number of processes, and a step judged incomplete is
# removed. Other damage is reported when the step is restored.
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "extra/metadata")


class CheckpointNotUsable(InputError):
    """A checkpoint that is missing, incomplete, or does not fit the run's state."""


def _missing_files(step_dir: Path) -> list[str]:
    return [name for name in _REQUIRED if not (step_dir / name).is_file()]


def _step_dirs(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()}


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of `directory` that hold a complete checkpoint (read from the file system; orbax is not asked)."""
    return sorted(step for step, path in _step_dirs(Path(directory)).items() if not _missing_files(path))


class RunCheckpoints:
    """The checkpoints of one run, in `directory` (keeps the newest `keep`; None: all).

    `read_only`: for readers of a run (export): nothing is created, cleaned or deleted, and incomplete steps are
    skipped. Otherwise the leftovers of crashes are removed first (by the primary process), with one line.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 2, read_only: bool = False):
        self.directory = Path(directory).resolve()
        self.keep, self.read_only = keep, read_only
        if not read_only and jax.process_index() == 0:
            self._clean()
        if not read_only and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"qlora_jax: cleaned {self.directory}")
        # max_to_keep=None: orbax deletes nothing itself (see `_prune`); a reader never calls save (orbax's own
        # read_only mode would only add warnings)
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only,
                                               enable_async_checkpointing=False)  # fmt: skip
        handlers = {"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _clean(self) -> None:
        """Removes what crashes left: steps being deleted, unfinished saves, incomplete step directories."""
        if not self.directory.is_dir():
            return
        removed = []
        trash = self.directory / TRASH
        if trash.exists():
            removed.append(f"{sum(1 for _ in trash.iterdir())} interrupted deletion(s) in {TRASH}/")
        unfinished = sorted(p for p in self.directory.iterdir() if _TMP_SUFFIX in p.name)
        if unfinished:
            removed.append(f"{len(unfinished)} unfinished save(s) ({', '.join(p.name for p in unfinished)})")
        incomplete = {step: path for step, path in _step_dirs(self.directory).items() if _missing_files(path)}
        if incomplete:
            removed.append(f"incomplete step(s) {', '.join(map(str, sorted(incomplete)))} (missing "
                           f"{', '.join(_missing_files(next(iter(incomplete.values())))[:3])}...)")  # fmt: skip
        for path in [*unfinished, *incomplete.values()]:
            self._discard(path)
        if trash.exists():
            shutil.rmtree(trash)
        if removed:
            print(f"{self.directory}: removed what an interrupted run left: {'; '.join(removed)}")

    def _discard(self, path: Path) -> None:
        """Renames `path` into the trash (atomic: it is no longer a step), then removes it."""
        trash = self.directory / TRASH
        trash.mkdir(exist_ok=True)
        target = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, target)
        shutil.rmtree(target)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState, extra: dict[str, Any]) -> Path:
        """Saves `state` and the JSON-able `extra` (data position, samples) at `state.step`, then deletes the
        checkpoints beyond `keep`, oldest first."""
        step = int(state.step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_savable(state)), extra=ocp.args.JsonSave(extra))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        self._prune()
        return self.directory / str(step)

    def _prune(self) -> None:
        steps = self.all_steps()
        if self.keep is None or len(steps) <= self.keep:
            return
        if jax.process_index() == 0:
            for step in steps[: len(steps) - self.keep]:
                self._discard(self.directory / str(step))
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"qlora_jax: pruned {self.directory} at {steps[-1]}")
        self._manager.reload()

    def all_steps(self) -> list[int]:
        steps = sorted(self._manager.all_steps())
        if self.read_only:  # nothing was cleaned: skip what is incomplete
            complete = set(complete_steps(self.directory))
            steps = [s for s in steps if s in complete]
        return steps

    def restore(
        self, like: TrainState, *, offload: bool = False, step: int | None = None, shardings: TrainState | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """A checkpoint (default: the latest), shaped like `like` (arrays or ShapeDtypeStructs) and placed by
        `shardings` (a TrainState of shardings; default: `like`'s own, else the first device); its optimizer state
        goes back to pinned host memory if offload."""
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointNotUsable(f"{self.directory}: no complete checkpoint")
            step = steps[-1]
        elif step not in steps:
            path = self.directory / str(step)
            if path.is_dir() and (missing := _missing_files(path)):
                raise CheckpointNotUsable(
                    f"{path}: not a complete checkpoint (missing {', '.join(missing)}; a save or deletion was "
                    f"interrupted); complete checkpoints: {', '.join(map(str, steps)) or 'none'}"
                )
            raise CheckpointNotUsable(f"{self.directory}: no checkpoint of step {step} (there are {steps})")
        if shardings is None:
            first = SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or first, like)
        # restored into device memory; moved to pinned host below (if offloaded)
        targets = jax.tree.map(lambda s: s.with_memory_kind("device"), shardings)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, targets)
        self._check_fits(step, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError, OSError) as e:  # orbax's and tensorstore's own words
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointNotUsable(
                f"{self.directory / str(step)}: cannot be restored into this run's state ({first[:300]}); is it a "
                "complete checkpoint of this run, written by this version? (Deleting it makes the one before it the "
                "latest.)"
            ) from e
        state = restored["state"]
        if offload:
            state = TrainState(state.step, state.lora, to_memory(state.opt_state, "pinned_host", shardings.opt_state))
        return state, restored["extra"]

    def _check_fits(self, step: int, like: Any) -> None:
        """Compares the checkpoint's array shapes (its metadata) with `like`'s, so that a mismatch is reported
        here, in this run's terms, rather than by orbax halfway through restoring."""
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 -- no metadata to compare: restore will say what is wrong
            return
        mine, theirs = _shapes(like), _shapes(stored)
        if mine == theirs:
            return
        path = self.directory / str(step)
        if mine.keys() != theirs.keys():
            only = sorted(set(theirs) ^ set(mine))[:3]
            raise CheckpointNotUsable(
                f"{path}: holds a state of another structure than this run's (e.g. {', '.join(only)} in only one of "
                "them): not a checkpoint of this config, or written by another version"
            )
        differ = [f"{k}: {theirs[k]} saved, {mine[k]} now" for k in mine if mine[k] != theirs[k]]
        raise CheckpointNotUsable(f"{path}: its arrays do not fit this run's state ({'; '.join(differ[:3])}"
                                  f"{'; ...' if len(differ) > 3 else ''})")  # fmt: skip

    def close(self) -> None:
        self._manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a tree's arrays, with orbax's metadata paths and ours (dict keys, attributes, indices) in
    the same words."""

    def name(key: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path if name(k) != "value"): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}  # fmt: skip


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
