"""A run's checkpoint -> a PEFT adapter directory, without loading the base model's weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
from flax import nnx

from qlora_jax.convert.peft import save_peft_adapter
from qlora_jax.files import check_output_directory, check_writable
from qlora_jax.train.build import abstract_model, base_model_name
from qlora_jax.train.config import config_from_dict
from qlora_jax.train.optim import make_optimizer
from qlora_jax.train.run.checkpoint import CheckpointNotUsable, RunCheckpoints
from qlora_jax.train.step import TrainState

__all__ = ["export_run"]


def export_run(run_dir: str | os.PathLike, output: str | os.PathLike, *, step: int | None = None) -> Path:
    """Writes the adapters of `run_dir`'s checkpoint at `step` (default: the latest complete one) in PEFT format to
    `output`.

    The run's `config.json` (written by `train`) says which model and adapters; only the model's config file is
    read, never its weights, so this is fast for any model size. The run directory is only read (a training may
    be writing it meanwhile). Raises CheckpointNotUsable (an InputError) for a run without checkpoints, a step
    that is missing or incomplete (an interrupted save or deletion), or one that does not fit the config.
    """
    run_dir = Path(run_dir)
    check_output_directory(output, "the adapter directory")
    check_writable(output, "the adapter directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointNotUsable(f"{run_dir}: not a training run directory (no config.json)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointNotUsable(f"{config_path}: not valid JSON ({e})") from e
    config = config_from_dict(raw, source=str(config_path))
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointNotUsable(f"{run_dir / 'checkpoints'}: no checkpoints to export")
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=None, read_only=True)
    try:
        model = abstract_model(config)
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        optimizer = make_optimizer(config.optim, config.train.steps)
        like = jax.eval_shape(lambda adapters: TrainState.create(adapters, optimizer), lora)
        state, _ = checkpoints.restore(like, step=step)
    finally:
        checkpoints.close()
    # The base weights are not read: a resized embedding's tables are not written (the run's own export at its end
    # writes them; docs/lora.md#added-tokens).
    return save_peft_adapter(
        nnx.merge(graphdef, state.lora, rest),
        output,
        config.lora,
        base_model_name_or_path=base_model_name(config),
        save_embedding_layers=False,
    )
