"""`train(config)`: load the 4-bit model, add adapters, stream batches, step, evaluate, checkpoint, resume, report.

Everything a run writes goes to `train.output_dir`: `checkpoints/` (orbax, atomic), `metrics.jsonl` (one line per
logged step and per evaluation), `loss.png`, `samples.json` (answers before and after), `config.json`, and the
adapter in PEFT format (`adapter/`) at the end. Killed and started again with the same config, a run resumes from
its last checkpoint and produces bit for bit the losses of an uninterrupted run.

With a `mesh` section the run spans devices (docs/scaling.md): weights, adapters and optimizer state are placed
by `qlora_jax.sharding`'s rule, each process feeds its own devices' rows of every batch, checkpoints are written
sharded, and only process 0 writes the other files. Multi-process runs start from the launcher's environment
(`qlora_jax.distributed`).

The parts, in the order `train` runs them: `set_up` (setup.py: model, data, placement, steps), `_start` (resume
from the last checkpoint, or report before training), `_run_steps` (the step loop: log, evaluate, save), `_finish`
(report after training, last checkpoint, loss curve) and `_export_adapter` (PEFT).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qlora_jax.distributed import initialize_from_environment, is_primary
from qlora_jax.models import DecoderLM
from qlora_jax.train import data as data_lib
from qlora_jax.train.checkpoint import RunCheckpoints
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.report import MetricsLog, device_memory, evaluate, plot_losses, report_after, report_before
from qlora_jax.train.setup import TrainingSetup, set_up
from qlora_jax.train.step import TrainState

__all__ = ["train", "TrainingDiverged", "TrainResult"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or Inf; training stopped before applying that update."""


@dataclasses.dataclass
class TrainResult:
    model: DecoderLM
    tokenizer: Any
    steps: int
    train_losses: list[float]
    eval_losses: list[tuple[int, float]]
    output_dir: Path
    exact_match_before: float | None = None
    exact_match_after: float | None = None


@dataclasses.dataclass
class _Progress:
    """Where a run is: its state, its position in the data, and what it reported before training (all of which a
    checkpoint holds)."""

    state: TrainState
    data: data_lib.BatchIterator
    samples: dict[str, Any]
    exact_match_before: float | None
    last_saved: int | None

    def save(self, checkpoints: RunCheckpoints) -> Path:
        extra = {"data": self.data.state(), "samples": self.samples, "exact_match_before": self.exact_match_before}
        path = checkpoints.save(self.state, extra)
        self.last_saved = int(self.state.step)
        return path


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Runs (or resumes) a QLoRA fine-tune as configured; see the module docstring for what it writes."""
    initialize_from_environment()  # multi-process launches (SLURM, or JAX_* variables); before any JAX work
    t = config.train
    primary = is_primary()
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if primary:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    setup = set_up(config, verbose=primary)
    metrics = MetricsLog(out / "metrics.jsonl", write=primary)
    checkpoints = RunCheckpoints(out / "checkpoints", keep=t.keep_checkpoints)
    try:
        run = _start(setup, checkpoints, metrics)
        _run_steps(setup, run, checkpoints, metrics, progress=progress and primary)
        model, exact_match_after = _finish(setup, run, checkpoints, metrics, out, primary=primary)
    finally:
        checkpoints.close()
    if t.export_peft:
        _export_adapter(setup, run.state.lora, out / "adapter", primary=primary)
    losses = [loss for _, loss in metrics.series("loss")]
    return TrainResult(model, setup.tokenizer, int(run.state.step), losses, metrics.series("eval_loss"), out,
                       run.exact_match_before, exact_match_after)  # fmt: skip


def _start(setup: TrainingSetup, checkpoints: RunCheckpoints, metrics: MetricsLog) -> _Progress:
    """The last checkpoint's progress (train.resume), or a fresh start with the reports before training."""
    config = setup.config
    iterator = data_lib.BatchIterator(setup.data.rows, config.train.batch_size, seed=config.data.seed)
    if config.train.resume and checkpoints.latest_step() is not None:
        state, extra = checkpoints.restore(setup.state, offload=config.optim.offload, shardings=setup.state_shardings)
        iterator.restore(extra["data"])
        step = int(state.step)
        metrics.start(metrics.read(up_to_step=step))
        print(f"resumed from {checkpoints.directory / str(step)} at step {step}")
        return _Progress(state, iterator, extra.get("samples", {}), extra.get("exact_match_before"), step)
    samples: dict[str, Any] = {}
    exact_match_before = report_before(setup, samples)
    metrics.start([] if exact_match_before is None else [{"step": 0, "eval_exact_match": exact_match_before}])
    return _Progress(setup.state, iterator, samples, exact_match_before, checkpoints.latest_step())


def _run_steps(setup: TrainingSetup, run: _Progress, checkpoints: RunCheckpoints, metrics: MetricsLog, *,
               progress: bool) -> None:  # fmt: skip
    """Steps `run` to `train.steps`: logs every `log_every`, evaluates every `eval_every`, saves every
    `save_every` (the last step's evaluation and checkpoint are `_finish`'s)."""
    from tqdm.auto import tqdm

    t = setup.config.train
    key = jax.random.key(t.seed)
    bar = tqdm(total=t.steps, initial=int(run.state.step), disable=not progress, desc="training", dynamic_ncols=True)
    try:
        while int(run.state.step) < t.steps:
            host_batch = next(run.data)
            batch = setup.step_batch(host_batch)
            started = time.perf_counter()
            run.state, step_metrics = setup.train_step(run.state, setup.base, batch, key)
            step_metrics = jax.device_get(step_metrics)
            elapsed = time.perf_counter() - started
            step = int(run.state.step)
            if not step_metrics["finite"]:
                raise _diverged(checkpoints, run.last_saved, step, step_metrics)
            tokens_per_s = int(np.count_nonzero(host_batch.segment_ids)) / elapsed  # every token the step processed
            bar.update(1)
            bar.set_postfix(loss=f"{float(step_metrics['loss']):.4f}", tok_s=f"{tokens_per_s:.0f}",
                            step_s=f"{elapsed:.2f}", mem=device_memory())  # fmt: skip
            if step % t.log_every == 0 or step == t.steps:
                metrics.log({"step": step, "loss": float(step_metrics["loss"]),
                             "grad_norm": float(step_metrics["grad_norm"]),
                             "learning_rate": float(step_metrics["learning_rate"]),
                             "target_tokens": int(step_metrics["tokens"]), "step_seconds": elapsed,
                             "tokens_per_second": tokens_per_s})  # fmt: skip
            if setup.data.eval_rows is not None and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                metrics.log({"step": step, "eval_loss": evaluate(setup, run.state.lora)})
            if t.save_every and step % t.save_every == 0 and step < t.steps:
                run.save(checkpoints)
    finally:
        bar.close()


def _diverged(checkpoints: RunCheckpoints, last_saved: int | None, step: int, metrics: dict) -> TrainingDiverged:
    where = f"the last good checkpoint is {checkpoints.directory / str(last_saved)}" if last_saved else (
        "no checkpoint was written yet")  # fmt: skip
    return TrainingDiverged(
        f"step {step}: loss {float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}; stopped "
        f"without applying it ({where}). Lower optim.learning_rate or set optim.max_grad_norm."
    )


def _finish(setup: TrainingSetup, run: _Progress, checkpoints: RunCheckpoints, metrics: MetricsLog, out: Path, *,
            primary: bool) -> tuple[DecoderLM, float | None]:  # fmt: skip
    """The reports after training (eval loss, exact match, samples), the last checkpoint and the loss curve."""
    model = setup.model_with(run.state.lora)
    step = int(run.state.step)
    if setup.data.eval_rows is not None:
        metrics.log({"step": step, "eval_loss": evaluate(setup, run.state.lora)})
    exact_match_after = report_after(setup, model, run.samples)
    if exact_match_after is not None:
        metrics.log({"step": step, "eval_exact_match": exact_match_after})
    if run.samples and primary:
        (out / "samples.json").write_text(json.dumps(run.samples, indent=2))
    if checkpoints.latest_step() != step:
        run.save(checkpoints)
    if primary:
        plot_losses(out / "loss.png", metrics.series("loss"), metrics.series("eval_loss"))
    return model, exact_match_after


def _export_adapter(setup: TrainingSetup, lora, directory: Path, *, primary: bool) -> None:
    """The adapters in PEFT format (`adapter/`), written by the primary process."""
    from qlora_jax.convert.peft import save_peft_adapter

    if jax.process_count() > 1:  # no process holds the sharded adapters whole: gather them (a collective)
        from jax.experimental import multihost_utils

        lora = multihost_utils.process_allgather(lora, tiled=True)
    if primary:
        config = setup.config
        save_peft_adapter(setup.model_with(lora), directory, config.lora, base_model_name_or_path=config.model.path)
