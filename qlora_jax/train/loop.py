"""`train(config)`: load the 4-bit model, add adapters, stream batches, step, evaluate, checkpoint, resume, report.

Everything a run writes goes to `train.output_dir`: `checkpoints/` (orbax, atomic), `metrics.jsonl` (one line per
logged step and per evaluation), `loss.png`, `samples.json` (answers before and after), `config.json`, and the
adapter in PEFT format (`adapter/`) at the end. Killed and started again with the same config, a run resumes from
its last checkpoint and produces bit for bit the losses of an uninterrupted run.

With a `mesh` section the run spans devices (docs/scaling.md): weights, adapters and optimizer state are placed
by `qlora_jax.sharding`'s rule, each process feeds its own devices' rows of every batch, checkpoints are written
sharded, and only process 0 writes the other files. Multi-process runs start from the launcher's environment
(`qlora_jax.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.distributed import initialize_from_environment, is_primary
from qlora_jax.generate import SamplingConfig, generate_text
from qlora_jax.lora import apply_lora, loftq_initialize, trainable_parameters
from qlora_jax.models import ComputeOptions, DecoderLM
from qlora_jax.tokenizer import load_tokenizer
from qlora_jax.train import data as data_lib
from qlora_jax.train.build import base_model_name, compute_options, quant_config
from qlora_jax.train.checkpoint import RunCheckpoints
from qlora_jax.train.config import TrainConfig, resolve_package_path
from qlora_jax.train.loss import IGNORE_INDEX, auto_chunk_size
from qlora_jax.train.optim import learning_rate_schedule, make_optimizer
from qlora_jax.train.parallel import StepShardings, configured_mesh, global_batch, place, step_shardings
from qlora_jax.train.plan import resolve_remat
from qlora_jax.train.step import BATCH_FIELDS, TrainState, make_eval_step, make_train_step

__all__ = ["train", "TrainingDiverged", "TrainResult", "load_model_for_training", "exact_match"]


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


def load_model_for_training(config: TrainConfig) -> tuple[DecoderLM, Any]:
    """The base model (quantized as configured), with adapters added (LoftQ-initialized if asked)."""
    m = config.model
    path = resolve_package_path(m.path)
    quant = quant_config(config)
    model, _ = load_pretrained(path, quantization=quant, dtype=jnp.dtype(m.dtype))
    tokenizer = load_tokenizer(resolve_package_path(m.tokenizer) if m.tokenizer else path)
    if config.lora.init_lora_weights == "loftq":
        if quant is None:
            raise ValueError("lora.init_lora_weights=loftq needs a quantized base (model.quant != none)")
        from qlora_jax.convert.hf import tensor_source

        errors = loftq_initialize(model, tensor_source(path), config.lora)
        plain = math.sqrt(sum(p**2 for p, _ in errors.values()))
        loftq = math.sqrt(sum(q**2 for _, q in errors.values()))
        print(f"LoftQ: ||W - (Q + sBA)||_F over adapted weights: {loftq:.4f} (plain init {plain:.4f})")
    else:
        apply_lora(model, config.lora, rngs=nnx.Rngs(config.train.seed))
    return model, tokenizer


def _batches(config: TrainConfig, tokenizer) -> tuple[data_lib.Batch, data_lib.Batch | None, list[dict]]:
    """Train rows, eval rows, and the eval records (for exact-match scoring)."""
    d = config.data
    kwargs = dict(max_length=d.max_length, loss_on=d.loss_on)
    train_examples = data_lib.load_examples(d.train, tokenizer, **kwargs)
    eval_records: list[dict] = []
    if d.eval:
        eval_examples = data_lib.load_examples(d.eval, tokenizer, **kwargs)
        eval_records = [record for _, record in data_lib.read_jsonl(d.eval)]
    elif d.eval_fraction > 0:
        train_examples, eval_examples = data_lib.split_train_eval(
            train_examples, eval_fraction=d.eval_fraction, seed=d.seed
        )
    else:
        eval_examples = []
    rows = (data_lib.pack_examples if d.packing else data_lib.pad_examples)(train_examples, d.max_length)
    eval_rows = data_lib.pad_examples(eval_examples, d.max_length) if eval_examples else None
    return rows, eval_rows, eval_records


def _as_step_batch(batch: data_lib.Batch, accum: int, sharding=None) -> dict[str, jax.Array]:
    """[accum, micro, T] arrays; on a mesh, global arrays of which this process supplies its devices' rows."""
    arrays = {f: getattr(batch, f).reshape(accum, -1, getattr(batch, f).shape[-1]) for f in BATCH_FIELDS}
    if sharding is not None:
        return global_batch(arrays, sharding)
    return {f: jnp.asarray(a) for f, a in arrays.items()}


def _padded_rows(arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The batch filled up to `rows` with copies of its first row that have no targets (they add nothing)."""
    missing = rows - arrays["tokens"].shape[0]
    if missing <= 0:
        return arrays
    out = {f: np.concatenate([a, np.repeat(a[:1], missing, axis=0)]) for f, a in arrays.items()}
    out["targets"][-missing:] = IGNORE_INDEX
    return out


def _evaluate(eval_step, lora, base, rows: data_lib.Batch, batch_size: int, max_batches: int,
              sharding=None) -> float:  # fmt: skip
    total, count = 0.0, 0
    n = rows.tokens.shape[0]
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches and i >= max_batches:
            break
        arrays = {f: getattr(rows, f)[start : start + batch_size] for f in BATCH_FIELDS}
        if sharding is None:
            batch = {f: jnp.asarray(a) for f, a in arrays.items()}
        else:  # every eval batch has the same rows, split over the mesh
            batch = global_batch(_padded_rows(arrays, batch_size), sharding)
        loss_sum, tokens = eval_step(lora, base, batch)
        total, count = total + float(loss_sum), count + int(tokens)
    return total / max(count, 1)


def _reference_and_prompt(record: dict) -> tuple[Any, str] | None:
    """(prompt for generate_text, reference answer) of a chat or prompt/completion record."""
    if "messages" in record:
        messages = record["messages"]
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1], messages[-1]["content"]
        return None
    if "prompt" in record and "completion" in record:
        return record["prompt"], record["completion"]
    return None


def exact_match(
    model: DecoderLM,
    tokenizer,
    records: list[dict],
    *,
    max_new_tokens: int = 48,
    options: ComputeOptions = ComputeOptions(),
) -> tuple[float, list[dict[str, str]]]:
    """The fraction of records whose greedy answer equals the reference (whitespace-stripped), and the answers."""
    pairs = [p for p in map(_reference_and_prompt, records) if p is not None]
    if not pairs:
        return float("nan"), []
    chat = "messages" in records[0]
    answers = generate_text(model, tokenizer, [p for p, _ in pairs], SamplingConfig(max_new_tokens=max_new_tokens),
                            chat=chat, options=options)  # fmt: skip
    rows = [
        {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"], "answer": a, "reference": ref}
        for a, (prompt, ref) in zip(answers, pairs, strict=True)
    ]
    return sum(r["answer"].strip() == r["reference"].strip() for r in rows) / len(rows), rows


def _print_samples(title: str, rows: list[dict[str, str]]) -> None:
    print(title)
    for row in rows:
        print(f"  {row['prompt']!r} -> {row['answer']!r}" + (f"  (expected {row['reference']!r})"
                                                              if "reference" in row else ""))  # fmt: skip


def _device_memory() -> str:
    """Peak device memory on an accelerator; on CPU, the process's resident memory (host is the device)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    used = stats.get("peak_bytes_in_use") or stats.get("bytes_in_use")
    if not used:
        try:
            with open("/proc/self/status") as f:
                used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            return "-"
    return f"{used / 2**30:.2f}GiB"


def _plot(path: Path, train_losses: list[tuple[int, float]], eval_losses: list[tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train_losses:
        ax.plot(*zip(*train_losses, strict=True), label="train loss", lw=1)
    if eval_losses:
        ax.plot(*zip(*eval_losses, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metric lines of earlier runs, up to the resumed step (later ones were never checkpointed)."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if m["step"] <= up_to_step]


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Runs (or resumes) a QLoRA fine-tune as configured; see the module docstring for what it writes."""
    from tqdm.auto import tqdm

    initialize_from_environment()  # multi-process launches (SLURM, or JAX_* variables); before any JAX work
    t = config.train
    primary = is_primary()
    mesh = configured_mesh(config)
    config, remat_choice = resolve_remat(config)  # train.remat: auto -> the cheapest policy within the budget
    if remat_choice is not None and primary:
        print(remat_choice.explain())
    options = compute_options(config)
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if primary:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    model, tokenizer = load_model_for_training(config)
    if primary:
        trainable_parameters(model)
    rows, eval_rows, eval_records = _batches(config, tokenizer)
    iterator = data_lib.BatchIterator(rows, t.batch_size, seed=config.data.seed)

    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(config.optim, t.steps)
    schedule = learning_rate_schedule(config.optim, t.steps)
    shardings: StepShardings | None = None
    # Generation (samples, exact match) runs in single-process runs only: it is not written for multi-host meshes.
    generating = jax.process_count() == 1
    if not generating and (t.samples or t.eval_exact_match):
        print("multi-process run: train.samples and train.eval_exact_match are skipped")
    if mesh is not None:
        quant = quant_config(config)
        shardings = step_shardings(mesh, lora, base, optimizer, offload=config.optim.offload,
                                   dq_blocksize=quant.dq_blocksize if quant else 256)  # fmt: skip
        del model  # its single-device copy of the weights goes with it
        lora, base = place(lora, shardings.state.lora), place(base, shardings.base)
        model = nnx.merge(graphdef, lora, base)
        print(f"mesh: data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over {mesh.size} devices, "
              f"{jax.process_count()} process(es)")  # fmt: skip
    state = TrainState.create(lora, optimizer, offload=config.optim.offload,
                              shardings=None if shardings is None else shardings.state)  # fmt: skip
    checkpoints = RunCheckpoints(out / "checkpoints", keep=t.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    samples: dict[str, Any] = {}
    em_before = None
    if t.resume and checkpoints.latest_step() is not None:
        state, extra = checkpoints.restore(state, offload=config.optim.offload,
                                           shardings=None if shardings is None else shardings.state)  # fmt: skip
        iterator.restore(extra["data"])
        history = _read_metrics(metrics_path, int(state.step))
        samples = extra.get("samples", {})
        em_before = extra.get("exact_match_before")
        print(f"resumed from {checkpoints.directory / str(int(state.step))} at step {int(state.step)}")
    else:
        if t.samples and generating:
            samples["before"] = generate_text(model, tokenizer, list(t.samples), SamplingConfig(max_new_tokens=48),
                                              options=options)  # fmt: skip
            _print_samples("before training:", [{"prompt": p, "answer": a} for p, a in zip(t.samples,
                                                samples["before"], strict=True)])  # fmt: skip
        if eval_records and t.eval_exact_match and generating:
            em_before, rows = exact_match(model, tokenizer, eval_records[: t.eval_exact_match], options=options)
            samples["eval_before"] = rows[:5]
            _print_samples(f"before training: eval exact match {em_before:.1%} on {len(rows)}; for example", rows[:5])
            history.append({"step": 0, "eval_exact_match": em_before})
    if primary:
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))

    chunk_size = t.loss_chunk_size or auto_chunk_size(model.config.vocab_size)
    train_step = make_train_step(graphdef, optimizer, chunk_size=chunk_size, options=options,
                                 offload_optimizer=config.optim.offload, learning_rate=schedule,
                                 shardings=shardings, packed_rows=config.data.packing)  # fmt: skip
    # Eval rows are always one example each (pad_examples).
    eval_step = make_eval_step(graphdef, chunk_size=chunk_size, options=options, shardings=shardings,
                               packed_rows=False)  # fmt: skip
    batch_sharding = None if shardings is None else shardings.batch
    eval_sharding = None if shardings is None else shardings.eval_batch
    key = jax.random.key(t.seed, impl=t.dropout_rng)  # LoRA dropout's bits: threefry, or XLA's RngBitGenerator

    def save() -> Path:
        extra = {"data": iterator.state(), "samples": samples, "exact_match_before": em_before}
        return checkpoints.save(state, extra)

    def log(record: dict) -> None:
        history.append(record)
        if primary:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    start_step = int(state.step)
    bar = tqdm(total=t.steps, initial=start_step, disable=not (progress and primary), desc="training",
               dynamic_ncols=True)  # fmt: skip
    last_saved = checkpoints.latest_step()
    while int(state.step) < t.steps:
        host_batch = next(iterator)
        batch_segments = host_batch.segment_ids
        batch = _as_step_batch(host_batch, t.grad_accum, batch_sharding)
        started = time.perf_counter()
        state, metrics = train_step(state, base, batch, key)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - started
        step = int(state.step)
        if not metrics["finite"]:
            bar.close()
            where = f"the last good checkpoint is {checkpoints.directory / str(last_saved)}" if last_saved else (
                "no checkpoint was written yet")  # fmt: skip
            raise TrainingDiverged(
                f"step {step}: loss {float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}; stopped "
                f"without applying it ({where}). Lower optim.learning_rate or set optim.max_grad_norm."
            )
        tokens_per_s = int(np.count_nonzero(batch_segments)) / elapsed  # every token the step processed
        bar.update(1)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{tokens_per_s:.0f}", step_s=f"{elapsed:.2f}",
                        mem=_device_memory())  # fmt: skip
        if step % t.log_every == 0 or step == t.steps:
            log({"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                 "learning_rate": float(metrics["learning_rate"]), "target_tokens": int(metrics["tokens"]),
                 "step_seconds": elapsed, "tokens_per_second": tokens_per_s})  # fmt: skip
        if eval_rows is not None and t.eval_every and step % t.eval_every == 0 and step < t.steps:
            log({"step": step, "eval_loss": _evaluate(eval_step, state.lora, base, eval_rows, t.batch_size,
                                                      t.eval_batches, eval_sharding)})  # fmt: skip
        if t.save_every and step % t.save_every == 0 and step < t.steps:
            save()
            last_saved = step
    bar.close()

    model = nnx.merge(graphdef, state.lora, base)
    if eval_rows is not None:
        log({"step": int(state.step), "eval_loss": _evaluate(eval_step, state.lora, base, eval_rows, t.batch_size,
                                                             t.eval_batches, eval_sharding)})  # fmt: skip
    em_after = None
    if eval_records and t.eval_exact_match and generating:
        em_after, rows = exact_match(model, tokenizer, eval_records[: t.eval_exact_match], options=options)
        samples["eval_after"] = rows[:5]
        _print_samples(f"after training: eval exact match {em_after:.1%} on {len(rows)}; for example", rows[:5])
        log({"step": int(state.step), "eval_exact_match": em_after})
    if t.samples and generating:
        samples["after"] = generate_text(model, tokenizer, list(t.samples), SamplingConfig(max_new_tokens=48),
                                         options=options)  # fmt: skip
        samples["prompts"] = list(t.samples)
        _print_samples("after training:", [{"prompt": p, "answer": a} for p, a in zip(t.samples, samples["after"],
                                                                                      strict=True)])  # fmt: skip
    if samples and primary:
        (out / "samples.json").write_text(json.dumps(samples, indent=2))
    if checkpoints.latest_step() != int(state.step):
        save()
    checkpoints.close()
    train_losses = [(m["step"], m["loss"]) for m in history if "loss" in m]
    eval_losses = [(m["step"], m["eval_loss"]) for m in history if "eval_loss" in m]
    if primary:
        _plot(out / "loss.png", train_losses, eval_losses)
    if t.export_peft:
        from qlora_jax.convert.peft import save_peft_adapter

        adapters = state.lora
        if jax.process_count() > 1:  # no process holds the sharded adapters whole: gather them (a collective)
            from jax.experimental import multihost_utils

            adapters = multihost_utils.process_allgather(adapters, tiled=True)
        if primary:
            save_peft_adapter(nnx.merge(graphdef, adapters, base), out / "adapter", config.lora,
                              base_model_name_or_path=base_model_name(config))  # fmt: skip
    return TrainResult(model, tokenizer, int(state.step), [loss for _, loss in train_losses], eval_losses, out,
                       em_before, em_after)  # fmt: skip
