"""What may change when a run resumes, and the check that runs before anything is loaded.

A checkpoint holds adapters of one shape, an optimizer state of one structure and a position in one sequence of
batches. Resuming with another model, other adapters, other data or another batch order would restore numbers
that mean something else (or fail inside orbax), so those fields are compared with the run's `config.json` first
and every difference is reported with both values. The fields in `RESUMABLE_FIELDS` change how long the run goes,
how often it reports and saves, how a step is computed (memory knobs, the mesh) or the optimizer's
hyperparameters: they may differ. docs/config.md lists both.

The data files are compared by content: `run.json` keeps each file's SHA-256 and record count.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qlora_jax.train.config import ConfigFieldError, TrainConfig, config_from_dict
from qlora_jax.train.data import DataError, check_data_file

__all__ = ["RESUMABLE_FIELDS", "ResumeError", "check_resumable", "data_fingerprint", "check_same_data"]

RESUMABLE_FIELDS: tuple[str, ...] = (
    # how long the run goes (the learning-rate schedule is recomputed over the new total), and what it reports
    "train.steps",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.export_peft",
    "train.resume",
    "train.divergence_factor",
    # how a step computes (results equal up to rounding), and where
    "train.remat",
    "train.memory_budget",
    "train.loss_chunk_size",
    "train.attention",
    "train.attention_block",
    "train.grad_accum",
    "optim.offload",
    "mesh.data",
    "mesh.fsdp",
    "mesh.expert_parallel",
    "mesh.initialization_timeout",
    "mesh.heartbeat_timeout_seconds",
    "mesh.shutdown_timeout_seconds",
    # the optimizer's hyperparameters (the state's structure does not depend on them): lower the learning rate or
    # clip the gradients and resume from the last good checkpoint
    "optim.learning_rate",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.end_lr_fraction",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.max_grad_norm",
    "train.output_dir",  # the same directory, perhaps moved
)
# Compared by content (run.json's SHA-256), not by path: the files may move, their content may not change.
DATA_FILES = ("data.train", "data.eval")


class ResumeError(ConfigFieldError):
    """The config (or the data) differs from the run's in a field that cannot change on resume."""


def _flat(raw: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{field}": value for section, fields in raw.items() for field, value in fields.items()}


def _normalized(config: TrainConfig) -> dict[str, Any]:
    """The config as its config.json holds it (tuples as lists)."""
    return _flat(json.loads(json.dumps(config.to_dict(), default=str)))


def check_resumable(config: TrainConfig, stored: dict[str, Any], *, source: str, data_by_content: bool = True) -> None:
    """Raises ResumeError naming every field of `config` that differs from the run's config.json (`stored`, read
    from `source`) and cannot change on resume, with both values. `data_by_content`: the data files' paths are not
    compared (`check_same_data` compares their content); False for runs without a run.json."""
    try:
        before = config_from_dict(stored, source=source)
    except ConfigFieldError as e:
        raise ResumeError(
            f"{e}\n{source} cannot be read as a run's config (written by another version?); to start a new run, use "
            "another train.output_dir"
        ) from e
    old, new = _normalized(before), _normalized(config)
    may_differ = RESUMABLE_FIELDS + (DATA_FILES if data_by_content else ())
    differences = [
        (field, old[field], new[field]) for field in new if field not in may_differ and old.get(field) != new[field]
    ]
    if differences:
        lines = "\n".join(f"  {field}: {a!r} in the run, {b!r} now" for field, a, b in differences)
        raise ResumeError(
            f"train.output_dir {config.train.output_dir} holds a run that this config cannot resume: "
            f"{len(differences)} field(s) differ from {source} and cannot change on resume:\n{lines}\n"
            "The checkpoints hold adapters, optimizer state and a data position for the run's values: use those to "
            "resume it, or another train.output_dir to start a new run."
        )


def _file_fingerprint(path: str, field: str) -> dict[str, Any]:
    check_data_file(path, field)
    digest, records = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            for line in f:
                digest.update(line)
                records += bool(line.strip())
    except OSError as e:
        raise DataError(f"{path}: cannot read {field} ({e.strerror or e})") from e
    return {"path": path, "sha256": digest.hexdigest(), "records": records}


def data_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """{"train": {path, sha256, records}, "eval": ... or None}: what `check_same_data` compares on resume.
    Raises DataError naming a data file that cannot be read."""
    d = config.data
    return {
        "train": _file_fingerprint(d.train, "data.train"),
        "eval": _file_fingerprint(d.eval, "data.eval") if d.eval else None,
    }


def check_same_data(now: dict[str, Any], stored: dict[str, Any] | None, *, source: str) -> None:
    """Raises ResumeError if a data file (`now`: `data_fingerprint`) differs in content from when the run started
    (`stored`: run.json's "data"; None for runs written before run.json existed, which are not checked here)."""
    if not stored:
        return
    if not isinstance(stored, dict) or not all(isinstance(stored.get(k), dict | None) for k in ("train", "eval")):
        raise ResumeError(f'{source}: malformed "data" record; use another train.output_dir')
    for name in ("train", "eval"):
        before, after = stored.get(name), now[name]
        if before is None and after is None or (before and after and before.get("sha256") == after["sha256"]):
            continue
        if before is None or after is None:
            raise ResumeError(
                f"data.{name}: {'none' if before is None else before.get('path')!r} in the run, "
                f"{'none' if after is None else after['path']!r} now; this cannot change on resume: use the run's "
                "data, or another train.output_dir to start a new run."
            )
        raise ResumeError(
            f"data.{name}: {after['path']} is not the file this run started with ({source}: {before.get('records')} "
            f"records, sha256 {str(before.get('sha256'))[:12]}...; now {after['records']} records, sha256 "
            f"{after['sha256'][:12]}...). A resumed run continues a position in the same batches: restore the "
            "data, or use another train.output_dir to start a new run."
        )


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the run directory, or ResumeError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path}: cannot read the run's {what} ({e}); use another train.output_dir") from e
