"""`train(config)`: load the 4-bit model, add adapters, stream batches, step, evaluate, checkpoint, resume, report.

Everything a run writes goes to `train.output_dir` (run/run_dir.py lists it): `checkpoints/` (orbax, atomic),
`metrics.jsonl` (one line per logged step and per evaluation), `loss.png`, `samples.json` (answers before and
after), `config.json`, `run.json`, and the adapter in PEFT format (`adapter/`) at the end. Killed and started again
with the same config, a run resumes from its last checkpoint and produces bit for bit the losses of an
uninterrupted run. One process at a time trains in a directory; nothing in it is written before the config, the
model and the data have been checked; a directory that is not one of our runs is refused, and a run is replaced
only when asked (`overwrite`; run/run_dir.py); a diverging run stops before saving bad weights
(run/divergence.py); SIGTERM or SIGINT stops the run after the current step with a checkpoint (run/stop.py).

With a `mesh` section the run spans devices (docs/scaling.md): weights, adapters and optimizer state are placed
by `qlora_jax.sharding`'s rule, each process feeds its own devices' rows of every batch, checkpoints are written
sharded, and only process 0 writes the other files. Multi-process runs start from the launcher's environment
(`qlora_jax.parallel.distributed`), agree on their start (run/startup.py: one decision, one shared directory) and stop
together.

This module is the driver: it ties train's step modules (setup.py, report.py, step.py) to what the run does to its
directory (`qlora_jax.train.run`), which never imports it. The parts, in the order `train` runs them: `started`
(run/startup.py, run/run_dir.py: may this config start, resume or replace a run here?), `set_up` (setup.py: model,
data, placement, steps), `_start` (resume from the last checkpoint, or report before training), `_run_steps` (the
step loop: log, evaluate, check, save, stop on a signal), `_finish` (report after training, last checkpoint, loss
curve) and `_export_adapter` (PEFT).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qlora_jax.models import DecoderLM
from qlora_jax.parallel.distributed import initialize_from_environment, is_primary
from qlora_jax.train import data as data_lib
from qlora_jax.train.build import base_model_name
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.report import (
    MetricsLog,
    batch_loss,
    device_memory,
    evaluate,
    plot_losses,
    report_after,
    report_before,
)
from qlora_jax.train.run.checkpoint import RunCheckpoints
from qlora_jax.train.run.divergence import DivergenceGuard, TrainingDiverged
from qlora_jax.train.run.resume import ResumeError, data_fingerprint
from qlora_jax.train.run.run_dir import RunDirectory
from qlora_jax.train.run.startup import started
from qlora_jax.train.run.stop import StopSignals, TrainingStopped
from qlora_jax.train.setup import TrainingSetup, set_up
from qlora_jax.train.step import TrainState

__all__ = ["train", "TrainingDiverged", "TrainingStopped", "TrainResult"]


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
    guard: DivergenceGuard
    last_batch: data_lib.Batch | None = None  # the batch of the last step run here, and its loss (before the step)
    last_loss: float | None = None

    def save(self, setup: TrainingSetup, checkpoints: RunCheckpoints) -> Path:
        """Checks the state (divergence rule 2), then saves it with the data position and the samples."""
        step = int(self.state.step)
        if self.last_batch is not None:
            self.guard.before_save(step, batch_loss(setup, self.state.lora, self.last_batch), self.last_loss)
        extra = {"data": self.data.state(), "samples": self.samples, "exact_match_before": self.exact_match_before}
        path = checkpoints.save(self.state, extra)
        self.guard.saved(step)
        return path


def train(
    config: TrainConfig, *, progress: bool = True, overwrite: bool = False, break_lock: bool = False
) -> TrainResult:
    """Runs (or resumes) a QLoRA fine-tune as configured; see the module docstring for what it writes.

    `overwrite`: replace the run in `train.output_dir` (its own files only) instead of resuming it or refusing.
    `break_lock`: take over a lock that another host holds (its process is known to be gone).

    Raises `qlora_jax.errors.QloraJaxError`s for what the user can fix: RunDirectoryLocked (another process trains
    there), NotARunDirectory (a directory with other files), ResumeError (a config or data that cannot resume this
    run, or a run that would be replaced), reader errors naming the file, TrainingDiverged (naming the last good
    checkpoint), TrainingStopped (a signal; naming the step to resume from), DistributedError (processes that do
    not come together).
    """
    t, mesh = config.train, config.mesh
    # multi-process launches (SLURM, or JAX_* variables); before any JAX work
    initialize_from_environment(
        initialization_timeout=mesh.initialization_timeout,
        heartbeat_timeout_seconds=mesh.heartbeat_timeout_seconds,
        shutdown_timeout_seconds=mesh.shutdown_timeout_seconds,
    )
    primary = is_primary()
    run_dir = RunDirectory(t.output_dir, primary=primary, break_lock=break_lock)
    data: dict[str, Any] = {}

    def decide():  # under the lock, before anything is loaded (by process 0 of several)
        data.update(data_fingerprint(config))
        return run_dir.decide(config, data, overwrite=overwrite)

    with StopSignals() as stop, started(run_dir, decide, timeout_s=mesh.initialization_timeout) as start:
        setup = set_up(config, verbose=primary, remat=start.remat)
        run_dir.write_start(setup.config, data, start)  # the inputs are read and checked: now the directory may change
        metrics = MetricsLog(run_dir.metrics, write=primary)
        checkpoints = RunCheckpoints(run_dir.checkpoints, keep=t.keep_checkpoints)
        try:
            run = _start(setup, checkpoints, metrics, resuming=start.resuming)
            stop.start_steps()
            _run_steps(setup, run, checkpoints, metrics, stop, progress=progress and primary)
            model, exact_match_after = _finish(setup, run, checkpoints, metrics, run_dir)
        finally:
            checkpoints.close()
        if stop.signum is not None and jax.process_count() == 1:  # a signal during the reports: stop before export
            raise stop.stopped(int(run.state.step), checkpoints.directory / str(int(run.state.step)))
        if t.export_peft:
            _export_adapter(setup, run.state.lora, run_dir.adapter, primary=primary)
    losses = [loss for _, loss in metrics.series("loss")]
    return TrainResult(
        model,
        setup.tokenizer,
        int(run.state.step),
        losses,
        metrics.series("eval_loss"),
        run_dir.path,
        run.exact_match_before,
        exact_match_after,
    )


def _start(setup: TrainingSetup, checkpoints: RunCheckpoints, metrics: MetricsLog, *, resuming: bool) -> _Progress:
    """The last checkpoint's progress (when resuming), or a fresh start with the reports before training."""
    config = setup.config
    iterator = data_lib.BatchIterator(setup.data.rows, config.train.batch_size, seed=config.data.seed)

    def guard(last_saved: int | None) -> DivergenceGuard:
        return DivergenceGuard(
            config.train.divergence_factor,
            max_grad_norm=config.optim.max_grad_norm,
            checkpoints=checkpoints.directory,
            last_saved=last_saved,
        )

    if resuming:
        state, extra = checkpoints.restore(setup.state, offload=config.optim.offload, shardings=setup.state_shardings)
        saved_rows = extra["data"].get("num_rows")
        if saved_rows is not None and saved_rows != setup.data.rows.num_rows:
            raise ResumeError(
                f"data.train gives {setup.data.rows.num_rows} training rows now, {saved_rows} when "
                f"{checkpoints.directory / str(int(state.step))} was written: the data (or how it is tokenized) "
                "changed; restore it, or use another train.output_dir to start a new run"
            )
        iterator.restore(extra["data"])
        step = int(state.step)
        metrics.start(metrics.read(up_to_step=step))
        print(f"resumed from {checkpoints.directory / str(step)} at step {step}")
        return _Progress(state, iterator, extra.get("samples", {}), extra.get("exact_match_before"), guard(step))
    samples: dict[str, Any] = {}
    exact_match_before = report_before(setup, samples)
    metrics.start([] if exact_match_before is None else [{"step": 0, "eval_exact_match": exact_match_before}])
    return _Progress(setup.state, iterator, samples, exact_match_before, guard(None))


def _run_steps(
    setup: TrainingSetup,
    run: _Progress,
    checkpoints: RunCheckpoints,
    metrics: MetricsLog,
    stop: StopSignals,
    *,
    progress: bool,
) -> None:
    """Steps `run` to `train.steps`: logs every `log_every`, evaluates every `eval_every`, saves every
    `save_every` (the last step's evaluation and checkpoint are `_finish`'s), and after a step at which `stop`
    says so, saves and raises TrainingStopped."""
    from tqdm.auto import tqdm

    t = setup.config.train
    key = jax.random.key(t.seed, impl=t.dropout_rng)  # LoRA dropout's bits: threefry, or XLA's RngBitGenerator
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
            loss = float(step_metrics["loss"])
            run.guard.after_step(step, loss, float(step_metrics["grad_norm"]))
            run.last_batch, run.last_loss = host_batch, loss
            tokens_per_s = int(np.count_nonzero(host_batch.segment_ids)) / elapsed  # every token the step processed
            bar.update(1)
            bar.set_postfix(
                loss=f"{float(step_metrics['loss']):.4f}",
                tok_s=f"{tokens_per_s:.0f}",
                step_s=f"{elapsed:.2f}",
                mem=device_memory(),
            )
            if step % t.log_every == 0 or step == t.steps:
                metrics.log(
                    {
                        "step": step,
                        "loss": float(step_metrics["loss"]),
                        "grad_norm": float(step_metrics["grad_norm"]),
                        "learning_rate": float(step_metrics["learning_rate"]),
                        "target_tokens": int(step_metrics["tokens"]),
                        "step_seconds": elapsed,
                        "tokens_per_second": tokens_per_s,
                    }
                )
            if setup.data.eval_rows is not None and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                metrics.log({"step": step, "eval_loss": evaluate(setup, run.state.lora)})
            saved = t.save_every and step % t.save_every == 0 and step < t.steps
            if saved:
                run.save(setup, checkpoints)
            if stop.requested(step):
                path = checkpoints.directory / str(step) if saved else run.save(setup, checkpoints)
                raise stop.stopped(step, path)
    finally:
        bar.close()


def _finish(
    setup: TrainingSetup, run: _Progress, checkpoints: RunCheckpoints, metrics: MetricsLog, run_dir: RunDirectory
) -> tuple[DecoderLM, float | None]:
    """The last checkpoint (checked first, like every one), the reports after training (eval loss, exact match,
    samples) and the loss curve."""
    model = setup.model_with(run.state.lora)
    step = int(run.state.step)
    if checkpoints.latest_step() != step:
        run.save(setup, checkpoints)
    if setup.data.eval_rows is not None:
        metrics.log({"step": step, "eval_loss": evaluate(setup, run.state.lora)})
    exact_match_after = report_after(setup, model, run.samples)
    if exact_match_after is not None:
        metrics.log({"step": step, "eval_exact_match": exact_match_after})
    if run.samples:
        run_dir.write_samples(run.samples)
    if run_dir.primary:
        plot_losses(run_dir.plot, metrics.series("loss"), metrics.series("eval_loss"))
    return model, exact_match_after


def _export_adapter(setup: TrainingSetup, lora, directory: Path, *, primary: bool) -> None:
    """The adapters in PEFT format (`adapter/`), written by the primary process."""
    from qlora_jax.convert.peft import save_peft_adapter

    if jax.process_count() > 1:  # no process holds the sharded adapters whole: gather them (a collective)
        from jax.experimental import multihost_utils

        lora = multihost_utils.process_allgather(lora, tiled=True)
    if primary:
        config = setup.config
        # a resized embedding goes with the adapter, as PEFT's save_embedding_layers writes it
        save_peft_adapter(
            setup.model_with(lora),
            directory,
            config.lora,
            base_model_name_or_path=base_model_name(config),
            save_embedding_layers=config.model.resize_token_embeddings is not None,
        )
