"""A run directory (`train.output_dir`): its files, its lock, and the decision to resume, start or replace.

    run.json        this program's mark on the directory, and the data files' SHA-256 and record counts
    config.json     the resolved config            metrics.jsonl  one line per log / evaluation
    samples.json    answers before and after       loss.png       the loss curve
    adapter/        the adapters in PEFT format    checkpoints/   orbax checkpoints of ours (checkpoint.py)
    .lock           the running process's pid and host (lock.py)

The rules (README, docs/config.md):
- A directory is one of our runs if its `run.json` says so (`"format": "qlora-jax run"`). A directory that holds
  anything else (a model's folder, a user's files, a run of an earlier version) is refused before anything is
  written into it, naming what it holds (symlinks resolved): `train` never writes into a directory it did not
  create or mark.
- One training process per directory (the lock).
- Nothing in it is written before the config, the model and the data have been read and checked; every file is
  written whole (`qlora_jax.files`): a crash leaves the old version or the new one.
- A run with checkpoints is resumed (`train.resume`), and only with a config that differs from its config.json in
  resumable fields (resume.py), checked before anything is loaded. A run that trained (metrics, adapter, samples)
  and has no checkpoint to resume from is never replaced, nor a run that cannot be resumed, unless asked to
  (`overwrite`: `qlora-jax train --overwrite`); replacing removes only the run's own files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_jax import files
from qlora_jax.errors import QloraJaxError
from qlora_jax.models import REMAT_POLICIES
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.run.checkpoint import OURS, complete_steps
from qlora_jax.train.run.lock import LOCK_FILE, RunLock
from qlora_jax.train.run.resume import ResumeError, check_resumable, check_same_data, read_json

__all__ = ["RunDirectory", "RunStart", "NotARunDirectory", "RUN_FORMAT"]

RUN_FORMAT = "qlora-jax run"  # run.json's "format": the mark of a directory this program created
_TRASH = ".qlora_jax-trash"  # the outputs of a replaced run, on their way out
_RESULTS = ("metrics.jsonl", "samples.json", "loss.png", "adapter")  # what a run that trained leaves
_OVERWRITE = "--overwrite (train(config, overwrite=True))"


class NotARunDirectory(QloraJaxError):
    """train.output_dir holds files and is not a run directory of this program."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunStart:
    """How a run starts in its directory: `resuming` from its checkpoints, or from step 0 `replacing` an existing
    run's outputs (or in a new directory); `remat`: the policy a resumed run started with (config.json)."""

    resuming: bool = False
    replacing: bool = False
    remat: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunStart:
        return cls(**json.loads(text))


def _listing(directory: Path, names: list[str], limit: int = 8) -> str:
    shown = [n + ("/" if (directory / n).is_dir() else "") for n in sorted(names)[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class RunDirectory:
    """The files of one run; `primary`: this process writes them (process 0 of a multi-process run)."""

    def __init__(self, path: str | os.PathLike, *, primary: bool = True, break_lock: bool = False):
        self.path = Path(path)
        self.primary = primary
        self.break_lock = break_lock
        self.config = self.path / "config.json"
        self.run_info = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.samples = self.path / "samples.json"
        self.plot = self.path / "loss.png"
        self.adapter = self.path / "adapter"
        self.checkpoints = self.path / "checkpoints"

    def is_run(self) -> bool:
        """Whether the directory carries this program's mark (run.json's format)."""
        try:
            info = json.loads(self.run_info.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and info.get("format") == RUN_FORMAT

    def check_claimable(self) -> None:
        """Refuses (NotARunDirectory) a directory that holds anything and is not one of our runs, naming what it
        holds and, for a symlink, where it leads. Changes nothing."""
        files.check_output_directory(self.path, "train.output_dir")
        if not self.path.is_dir() or self.is_run():
            return
        real = self.path.resolve()
        held = [p.name for p in real.iterdir() if p.name not in (LOCK_FILE, _TRASH)]
        if not held:
            return
        where = f"{self.path} (a link to {real})" if real != self.path.absolute() else str(self.path)
        earlier = (
            " (its run.json is not this version's: a run of an earlier qlora-jax, which this version does not resume)"
            if "run.json" in held and "config.json" in held
            else ""
        )
        raise NotARunDirectory(
            f"train.output_dir {where} is not a run directory of qlora-jax and is not empty: it holds "
            f"{_listing(real, held)}{earlier}; train writes only into a new or empty directory or one of its own "
            "runs: give another train.output_dir (nothing was changed)"
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDirectory]:
        """Checks the directory (`check_claimable`) and holds its lock (primary process only) for the block. A
        directory this created and left empty (the run failed before writing anything) is removed again."""
        if not self.primary:
            yield self
            return
        self.check_claimable()  # before the lock file is written into it
        created = not self.path.exists()
        try:
            with RunLock(self.path, break_lock=self.break_lock):
                self.check_claimable()  # again, now that no other train of ours can change it
                shutil.rmtree(self.path / _TRASH, ignore_errors=True)  # a replacement that was interrupted
                yield self
        finally:
            if created and self.path.is_dir() and not any(self.path.iterdir()):
                shutil.rmtree(self.path, ignore_errors=True)

    def _results(self) -> list[str]:
        """The outputs of training in the directory (a metrics file with lines, the adapter, samples, the plot)."""
        found = []
        for name in _RESULTS:
            path = self.path / name
            if path.exists() and not (name == "metrics.jsonl" and path.is_file() and not path.read_text().strip()):
                found.append(name)
        return found

    def decide(self, config: TrainConfig, data: dict[str, Any], *, overwrite: bool = False) -> RunStart:
        """How `config` starts here, after checking that it may (call it before loading anything; it reads only
        run.json, config.json and the checkpoints' names). Resuming checks the config against config.json and the
        data (`data`: `resume.data_fingerprint`) against run.json. Raises ResumeError for a run that this config
        cannot resume and `overwrite` does not replace."""
        if not self.is_run():  # a new (or empty) directory: check_claimable refused anything else
            return RunStart()
        steps = complete_steps(self.checkpoints)
        results = self._results()
        if overwrite:
            return RunStart(replacing=bool(steps or results))
        if not steps:
            if results:
                raise ResumeError(
                    f"train.output_dir {self.path} holds a run that trained ({_listing(self.path, results)}) and "
                    f"has no checkpoint to resume from (checkpoints/ deleted?): a run is never replaced without "
                    f"{_OVERWRITE}; or use another train.output_dir"
                )
            return RunStart()  # a run that never finished a step: nothing of it to keep
        if not config.train.resume:
            raise ResumeError(
                f"train.output_dir {self.path} holds checkpoints of a run (steps {', '.join(map(str, steps))}) and "
                f"train.resume is false: use another train.output_dir to start a new run, resume this one, or "
                f"replace it with {_OVERWRITE}"
            )
        if not self.config.is_file():
            raise ResumeError(f"{self.path}: has checkpoints but no config.json; use another train.output_dir")
        stored_data = read_json(self.run_info, "data record").get("data")
        check_resumable(
            config, read_json(self.config, "config"), source=str(self.config), data_by_content=stored_data is not None
        )
        check_same_data(data, stored_data, source=str(self.run_info))
        remat = read_json(self.config, "config").get("train", {}).get("remat")
        return RunStart(resuming=True, remat=remat if remat in REMAT_POLICIES and remat != "auto" else None)

    def write_start(self, config: TrainConfig, data: dict[str, Any], start: RunStart) -> None:
        """The run's mark (run.json, with the data record) and config.json (`train.remat` resolved), after the
        inputs have been checked; a replaced run's outputs are removed first (only the run's own files)."""
        if not self.primary:
            return
        if start.replacing:
            self._remove_outputs()
        files.write_text(self.run_info, json.dumps({"format": RUN_FORMAT, "data": data}, indent=2))
        files.write_text(self.config, json.dumps(config.to_dict(), indent=2, default=str))

    def _remove_outputs(self) -> None:
        """Moves the run's own outputs (its results and its checkpoints, not other files) into a trash directory
        (one rename each), then removes it."""
        trash = self.path / _TRASH
        trash.mkdir(exist_ok=True)
        ours = [self.path / name for name in _RESULTS]
        if self.checkpoints.is_dir():
            ours += [self.checkpoints / str(step) for step in complete_steps(self.checkpoints)]
            ours.append(self.checkpoints / OURS)
        moved = []
        for path in ours:
            if path.exists():
                os.rename(path, trash / f"{path.name}-{uuid.uuid4().hex[:8]}")
                moved.append(str(path.relative_to(self.path)))
        shutil.rmtree(trash)
        if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()
        print(f"{self.path}: replaced the run it held (--overwrite): removed {', '.join(moved) or 'nothing'}")

    def write_samples(self, samples: dict[str, Any]) -> None:
        if self.primary:
            files.write_text(self.samples, json.dumps(samples, indent=2))
