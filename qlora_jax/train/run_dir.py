"""A run directory (`train.output_dir`): its files, its lock, and the decision to resume or start.

    config.json     the resolved config            run.json      the data files' SHA-256 and record counts
    metrics.jsonl   one line per log / evaluation  samples.json  answers before and after
    loss.png        the loss curve                 adapter/      the adapters in PEFT format
    checkpoints/    orbax checkpoints (checkpoint.py)
    .lock           the running process's pid and host (lock.py)

The rules (README, docs/config.md): one training process per directory (the lock); nothing in it is written before
the config, the model and the data have been read and checked; every file is written whole (`qlora_jax.files`):
a crash leaves the old version or the new one. A directory with checkpoints is resumed (`train.resume`), and only
with a config that differs from its config.json in resumable fields (resume.py), checked before anything is
loaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_jax import files
from qlora_jax.models import REMAT_POLICIES
from qlora_jax.train.checkpoint import complete_steps
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.lock import RunLock
from qlora_jax.train.resume import ResumeError, check_resumable, check_same_data, read_json

__all__ = ["RunDirectory"]


class RunDirectory:
    """The files of one run; `primary`: this process writes them (process 0 of a multi-process run)."""

    def __init__(self, path: str | Path, *, primary: bool = True):
        self.path = Path(path)
        self.primary = primary
        self.config = self.path / "config.json"
        self.run_info = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.samples = self.path / "samples.json"
        self.plot = self.path / "loss.png"
        self.adapter = self.path / "adapter"
        self.checkpoints = self.path / "checkpoints"

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDirectory]:
        """Holds the directory's lock (primary process only) for the block. A directory this created and left
        empty (the run failed before writing anything) is removed again."""
        if not self.primary:
            yield self
            return
        created = not self.path.exists()
        files.check_output_directory(self.path, "train.output_dir")
        try:
            with RunLock(self.path):
                yield self
        finally:
            if created and self.path.is_dir() and not any(self.path.iterdir()):
                shutil.rmtree(self.path, ignore_errors=True)

    def resumes(self, config: TrainConfig, data: dict[str, Any]) -> bool:
        """True if `config` resumes this run (it has checkpoints and train.resume is set), after checking that it
        may: the config against config.json, the data (`data`: `resume.data_fingerprint`) against run.json.
        Reads only those files: call it before loading anything."""
        steps = complete_steps(self.checkpoints)
        if not steps:
            return False
        if not config.train.resume:
            raise ResumeError(
                f"train.output_dir {self.path} holds checkpoints of a run (steps {', '.join(map(str, steps))}) and "
                "train.resume is false: use another train.output_dir to start a new run (or resume this one)"
            )
        if not self.config.is_file():
            raise ResumeError(f"{self.path}: has checkpoints but no config.json; use another train.output_dir")
        info = read_json(self.run_info, "data record") if self.run_info.is_file() else {}
        stored_data = info.get("data") if isinstance(info, dict) else None
        check_resumable(config, read_json(self.config, "config"), source=str(self.config),
                        data_by_content=stored_data is not None)  # fmt: skip
        check_same_data(data, stored_data, source=str(self.run_info))
        return True

    def stored_remat(self) -> str | None:
        """The checkpointing policy config.json records (`train.remat: auto` resolved when the run started), or
        None. Read after `resumes` has checked the file."""
        remat = read_json(self.config, "config").get("train", {}).get("remat")
        return remat if remat in REMAT_POLICIES and remat != "auto" else None

    def write_start(self, config: TrainConfig, data: dict[str, Any]) -> None:
        """config.json (the config with `train.remat` resolved) and run.json of a run that starts or resumes
        (after its inputs have been checked)."""
        if self.primary:
            files.write_text(self.config, json.dumps(config.to_dict(), indent=2, default=str))
            files.write_text(self.run_info, json.dumps({"data": data}, indent=2))

    def write_samples(self, samples: dict[str, Any]) -> None:
        if self.primary:
            files.write_text(self.samples, json.dumps(samples, indent=2))
