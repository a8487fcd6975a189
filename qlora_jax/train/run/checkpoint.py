"""Orbax checkpoints of a run: adapters, optimizer state, step, and the data position, written atomically and
verified when read.

Orbax writes each checkpoint into a temporary directory and renames it when complete; then this module writes the
step's manifest, `N/qlora_jax.json` (every file's size and SHA-256, `qlora_jax.integrity`): the manifest is
what makes a step complete and ours. `restore` verifies every file against it first, so a changed byte is an error
naming the file, never altered weights.

Only what this program provably wrote is ever removed. `checkpoints/.qlora_jax/` is ours: `journal.json` names
the step being saved, and `trash/` holds steps being deleted. Old checkpoints (beyond `keep`) are deleted by
renaming them into the trash (one atomic rename) and then removing them, so a crash never leaves a half-deleted
step among the complete ones. On start (`RunCheckpoints(...)`), what crashes left is removed, with one line: the
trash, and the step the journal says was being saved (orbax's `N.orbax-checkpoint-tmp*` directories, or `N/`
without its manifest). Anything else in `checkpoints/` (another program's steps, a user's folder, checkpoints of
earlier versions without a manifest) is left as it is, named in one line, and never read as a checkpoint of
this run; a step this run would save over such a directory is refused.

Arrays are saved as they are placed: a state sharded over a mesh is written shard by shard, each by the process
that holds it (multi-host runs need a directory every host can reach). `restore` places each array where the
target says (`shardings`, or the shardings of `like`), whatever the device count it was saved from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from qlora_jax import files
from qlora_jax.errors import InputError
from qlora_jax.integrity import IntegrityError, read_manifest, verify_manifest, write_manifest
from qlora_jax.train.optim import to_memory
from qlora_jax.train.step import TrainState

__all__ = ["RunCheckpoints", "CheckpointNotUsable", "complete_steps", "MANIFEST", "OURS", "foreign_entries"]

OURS = ".qlora_jax"  # checkpoints/.qlora_jax/: the journal and the trash, this program's own
MANIFEST = "qlora_jax.json"  # N/qlora_jax.json: the files of a complete step of ours, with their checksums
_FORMAT = "qlora-jax checkpoint"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's unfinished saves: `<step>.orbax-checkpoint-tmp-<time>`
# The metadata every complete orbax checkpoint holds (`state` by StandardSave, `extra` by JsonSave), written before
# orbax commits the step by renaming it.
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "extra/metadata")


class CheckpointNotUsable(InputError):
    """A checkpoint that is missing, incomplete, or does not fit the run's state."""


def _missing_files(step_dir: Path) -> list[str]:
    return [name for name in _REQUIRED if not (step_dir / name).is_file()]


def _step_dirs(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()}


def _is_ours(step_dir: Path) -> bool:
    manifest = read_manifest(step_dir, MANIFEST)
    return manifest is not None and manifest.get("format") == _FORMAT and not _missing_files(step_dir)


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of `directory` that hold a complete checkpoint of ours (orbax's files and our manifest; read
    from the file system, orbax is not asked)."""
    return sorted(step for step, path in _step_dirs(Path(directory)).items() if _is_ours(path))


def foreign_entries(directory: str | os.PathLike) -> list[str]:
    """The names in `directory` that are neither a complete step of ours nor our own bookkeeping (nor an unfinished
    save the journal names): what this program did not write and leaves alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ours = {str(step) for step in complete_steps(directory)} | {OURS}
    saving = _journal(directory).get("saving")
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in directory.iterdir()
        if p.name not in ours and not _being_saved(p.name, saving)
    )


def _journal(directory: Path) -> dict[str, Any]:
    try:
        journal = json.loads((directory / OURS / "journal.json").read_text())
    except (OSError, ValueError):
        return {}
    return journal if isinstance(journal, dict) else {}


def _being_saved(name: str, saving: Any) -> bool:
    """Whether `name` is the step the journal says was being saved, or one of orbax's temporaries for it."""
    return isinstance(saving, int) and (name == str(saving) or name.startswith(f"{saving}{_TMP_SUFFIX}"))


class RunCheckpoints:
    """The checkpoints of one run, in `directory` (keeps the newest `keep`; None: all).

    `read_only`: for readers of a run (export): nothing is created, cleaned or deleted, and only complete steps of
    ours are listed. Otherwise the leftovers of crashes are removed first (by the primary process), with one line.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 2, read_only: bool = False):
        self.directory = Path(directory).resolve()
        self.keep, self.read_only = keep, read_only
        self._primary = jax.process_index() == 0
        if not read_only and self._primary:
            self._clean()
        self._barrier("cleaned")
        # max_to_keep=None: orbax deletes nothing itself (see `_prune`); a reader never calls save (orbax's own
        # read_only mode would only add warnings)
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only, enable_async_checkpointing=False)
        handlers = {"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _barrier(self, what: str) -> None:
        if not self.read_only and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"qlora_jax: {what} {self.directory}")

    @property
    def _ours(self) -> Path:
        return self.directory / OURS

    def _set_journal(self, saving: int | None) -> None:
        self._ours.mkdir(parents=True, exist_ok=True)
        files.write_text(self._ours / "journal.json", json.dumps({"saving": saving}))

    def _clean(self) -> None:
        """Removes what crashes of this program left (the trash; the step the journal names, unfinished), and
        names in one line what is not ours (left alone)."""
        if not self.directory.is_dir():
            return
        removed = []
        trash = self._ours / "trash"
        if trash.is_dir() and any(trash.iterdir()):
            removed.append(f"{sum(1 for _ in trash.iterdir())} interrupted deletion(s)")
        saving = _journal(self.directory).get("saving")
        unfinished = sorted(
            p
            for p in self.directory.iterdir()
            if _being_saved(p.name, saving) and not (p.name == str(saving) and _is_ours(p))
        )
        if unfinished:
            removed.append(f"the unfinished save of step {saving} ({', '.join(p.name for p in unfinished)})")
        for path in unfinished:
            self._discard(path)
        shutil.rmtree(trash, ignore_errors=True)
        if saving is not None:
            self._set_journal(None)
        if removed:
            print(f"{self.directory}: removed what an interrupted run left: {'; '.join(removed)}")
        if foreign := foreign_entries(self.directory):
            print(
                f"{self.directory}: leaving alone {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this "
                f"program did not write ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
            )

    def _discard(self, path: Path) -> None:
        """Renames `path` into the trash (atomic: it is no longer a step), then removes it."""
        trash = self._ours / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, target)
        shutil.rmtree(target)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState, extra: dict[str, Any]) -> Path:
        """Saves `state` and the JSON-able `extra` (data position, samples) at `state.step`, writes the step's
        manifest (what makes it complete), then deletes the checkpoints beyond `keep`, oldest first. Refuses
        (CheckpointNotUsable) to save over a directory of that step that is not ours."""
        step = int(state.step)
        path = self.directory / str(step)
        if path.exists() and not _is_ours(path):
            raise CheckpointNotUsable(
                f"{path}: exists and was not written by this run (no {MANIFEST}): this run "
                f"cannot save its step {step} there; move it away, and run again to "
                "resume"
            )
        if self._primary:
            self._set_journal(step)
        self._barrier(f"saving {step} in")
        args = ocp.args.Composite(state=ocp.args.StandardSave(_savable(state)), extra=ocp.args.JsonSave(extra))
        absl = logging.getLogger("absl")  # orbax logs a failed write from each of its threads: one line is ours
        level = absl.level
        absl.setLevel(logging.CRITICAL)
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
            self._barrier(f"saved {step} in")  # every process's shards are written before they are listed
            if self._primary:
                write_manifest(path, MANIFEST, {"format": _FORMAT, "step": step})
                self._set_journal(None)
        except (OSError, ValueError, RuntimeError) as e:  # tensorstore's and orbax's words for a full disk, ...
            raise files.output_error(e, path, f"the checkpoint of step {step}") from e
        finally:
            absl.setLevel(level)
        self._barrier(f"committed {step} in")
        self._prune()
        return path

    def _prune(self) -> None:
        steps = self.all_steps()
        if self.keep is None or len(steps) <= self.keep:
            return
        if self._primary:
            for step in steps[: len(steps) - self.keep]:
                self._discard(self.directory / str(step))
            shutil.rmtree(self._ours / "trash", ignore_errors=True)
        self._barrier(f"pruned at {steps[-1]}")
        self._manager.reload()

    def all_steps(self) -> list[int]:
        """The complete steps of ours, oldest first (orbax's steps without our manifest are not this run's)."""
        ours = set(complete_steps(self.directory))
        return sorted(step for step in self._manager.all_steps() if step in ours)

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
            if path.is_dir():
                missing = _missing_files(path) or ([] if read_manifest(path, MANIFEST) else [MANIFEST])
                why = (
                    f"missing {', '.join(missing)}: a save or deletion was interrupted, or another program wrote it"
                    if missing
                    else "not written by this program"
                )
                raise CheckpointNotUsable(
                    f"{path}: not a complete checkpoint of this run ({why}); complete "
                    f"checkpoints: {', '.join(map(str, steps)) or 'none'}"
                )
            raise CheckpointNotUsable(f"{self.directory}: no checkpoint of step {step} (there are {steps})")
        try:
            verify_manifest(self.directory / str(step), MANIFEST)  # every byte as it was saved, before orbax reads
        except IntegrityError as e:
            raise CheckpointNotUsable(
                f"{e}; deleting {self.directory / str(step)} makes the checkpoint before it the latest"
            ) from None
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
        raise CheckpointNotUsable(
            f"{path}: its arrays do not fit this run's state ({'; '.join(differ[:3])}"
            f"{'; ...' if len(differ) > 3 else ''})"
        )

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
    return {
        "/".join(name(k) for k in path if name(k) != "value"): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


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
