"""What a run reports: eval loss, greedy answers to sample prompts, exact-match scores, the metrics log, the loss
curve and the memory in use.

Each report is a function of a `TrainingSetup` and the adapters to report on; a new metric is one function here
and one call in `train()` (loop.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jax

from qlora_jax import files
from qlora_jax.generate import SamplingConfig, generate_text
from qlora_jax.models import ComputeOptions, DecoderLM
from qlora_jax.train.setup import TrainingSetup

__all__ = [
    "evaluate",
    "batch_loss",
    "exact_match",
    "MetricsLog",
    "report_before",
    "report_after",
    "plot_losses",
    "device_memory",
]

SAMPLE_TOKENS = 48  # new tokens of every sample answer and exact-match answer
SHOWN = 5  # answers printed and kept in samples.json per exact-match evaluation


def _mean_loss(setup: TrainingSetup, lora, rows, batch_rows: int, max_batches: int = 0) -> float:
    total, count = 0.0, 0
    for batch in setup.eval_batches(rows, batch_rows, max_batches):
        loss_sum, tokens = setup.eval_step(lora, setup.base, batch)
        total, count = total + float(loss_sum), count + int(tokens)
    return total / max(count, 1)


def evaluate(setup: TrainingSetup, lora) -> float:
    """The mean loss per target token over the eval rows (`train.eval_batches` batches of `train.batch_size`)."""
    t = setup.config.train
    return _mean_loss(setup, lora, setup.data.eval_rows, t.batch_size, t.eval_batches)


def batch_loss(setup: TrainingSetup, lora, batch) -> float:
    """The mean loss per target token of `lora` on one training batch (a `data.Batch` of `train.batch_size`
    rows), without dropout, a micro-batch at a time (no more memory than a step): how the divergence check
    judges the weights a step produced."""
    t = setup.config.train
    return _mean_loss(setup, lora, batch, t.batch_size // t.grad_accum)


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
    max_new_tokens: int = SAMPLE_TOKENS,
    options: ComputeOptions = ComputeOptions(),
) -> tuple[float, list[dict[str, str]]]:
    """The fraction of records whose greedy answer equals the reference (whitespace-stripped), and the answers."""
    pairs = [p for p in map(_reference_and_prompt, records) if p is not None]
    if not pairs:
        return float("nan"), []
    chat = "messages" in records[0]
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)  # whatever the checkpoint's defaults
    answers = generate_text(model, tokenizer, [p for p, _ in pairs], greedy, chat=chat, options=options)
    rows = [
        {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"], "answer": a, "reference": ref}
        for a, (prompt, ref) in zip(answers, pairs, strict=True)
    ]
    return sum(r["answer"].strip() == r["reference"].strip() for r in rows) / len(rows), rows


def _print_samples(title: str, rows: list[dict[str, str]]) -> None:
    print(title)
    for row in rows:
        print(
            f"  {row['prompt']!r} -> {row['answer']!r}"
            + (f"  (expected {row['reference']!r})" if "reference" in row else "")
        )


def _generating(setup: TrainingSetup) -> bool:
    """Generation (samples, exact match) runs in single-process runs only: it is not written for multi-host meshes."""
    return jax.process_count() == 1


def _answers(setup: TrainingSetup, model: DecoderLM) -> list[str]:
    prompts = list(setup.config.train.samples)
    return generate_text(
        model,
        setup.tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=SAMPLE_TOKENS, temperature=0.0),
        options=setup.options,
    )


def _exact_match(setup: TrainingSetup, model: DecoderLM, when: str, samples: dict[str, Any]) -> float:
    t = setup.config.train
    score, rows = exact_match(
        model, setup.tokenizer, setup.data.eval_records[: t.eval_exact_match], options=setup.options
    )
    samples[f"eval_{when}"] = rows[:SHOWN]
    _print_samples(f"{when} training: eval exact match {score:.1%} on {len(rows)}; for example", rows[:SHOWN])
    return score


def report_before(setup: TrainingSetup, samples: dict[str, Any]) -> float | None:
    """Answers to `train.samples` and the exact-match score before training (into `samples`); the score."""
    t = setup.config.train
    if not _generating(setup):
        if t.samples or t.eval_exact_match:
            print("multi-process run: train.samples and train.eval_exact_match are skipped")
        return None
    if t.samples:
        samples["before"] = _answers(setup, setup.model)
        _print_samples(
            "before training:", [{"prompt": p, "answer": a} for p, a in zip(t.samples, samples["before"], strict=True)]
        )
    if setup.data.eval_records and t.eval_exact_match:
        return _exact_match(setup, setup.model, "before", samples)
    return None


def report_after(setup: TrainingSetup, model: DecoderLM, samples: dict[str, Any]) -> float | None:
    """Answers to `train.samples` and the exact-match score of the trained `model` (into `samples`); the score."""
    t = setup.config.train
    if not _generating(setup):
        return None
    score = None
    if setup.data.eval_records and t.eval_exact_match:
        score = _exact_match(setup, model, "after", samples)
    if t.samples:
        samples["after"] = _answers(setup, model)
        samples["prompts"] = list(t.samples)
        _print_samples(
            "after training:", [{"prompt": p, "answer": a} for p, a in zip(t.samples, samples["after"], strict=True)]
        )
    return score


class MetricsLog:
    """`metrics.jsonl`: one JSON object a line, each with its `step`; `history` holds them all in memory too.
    Only the primary process writes the file."""

    def __init__(self, path: Path, *, write: bool):
        self.path, self.write, self.history = path, write, []

    def read(self, up_to_step: int) -> list[dict]:
        """Metric lines of earlier runs, up to the resumed step (later ones were never checkpointed). A line that
        is not a JSON object with a step (the torn last line of a killed run) is dropped."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= up_to_step:
                kept.append(record)
        return kept

    def start(self, history: list[dict]) -> None:
        """Starts the file (replaced whole, atomically) with `history`: the lines kept from earlier runs, or none."""
        self.history = list(history)
        if self.write:
            files.write_text(self.path, "".join(json.dumps(m) + "\n" for m in self.history))

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def series(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of every line that has `name`."""
        return [(m["step"], m[name]) for m in self.history if name in m]


def plot_losses(path: Path, train_losses: list[tuple[int, float]], eval_losses: list[tuple[int, float]]) -> None:
    """The loss curve (train per logged step, eval as points) as a PNG."""
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    files.write_bytes(path, png.getvalue())


def device_memory() -> str:
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
