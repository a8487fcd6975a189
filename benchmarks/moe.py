"""A mixture-of-experts QLoRA step on CPU: qlora-jax against transformers + PEFT on the same shapes, in one run.

    python benchmarks/moe.py [--batch 4] [--seq 128] [--steps 5] [--threads N] [--json out.json] [--smoke]

One random Qwen3-MoE (float32 weights saved once in a temporary directory, which every configuration loads, so the
weights are identical) trains on the same batch, each configuration in a fresh subprocess:

  ours-nf4        qlora-jax: attention and every expert in NF4 with double quantization, router 16/32-bit
  ours-dense      qlora-jax, the same model dense (float32)
  torch-dense     transformers 5 + PEFT 0.21, dense float32 (its grouped-expert forward: a loop over the experts hit)
  torch-bnb       transformers 5 + bitsandbytes 4-bit + PEFT: attention in NF4; transformers' bitsandbytes
                  integration quantizes nn.Linear layers only, so the experts and router stay float32

Adapters: PEFT's all-linear on this model (attention, router, and both expert parameters, gate and up fused at
rank 2r: docs/moe.md), r=8, lora_alpha=16, no dropout (PEFT refuses it on parameters); AdamW on the adapters
(lr 2e-4, gradients clipped to norm 1.0); float32 compute; no gradient checkpointing on either side. The loss is
next-token cross-entropy on every token (no load-balancing loss).

Measured per configuration: the first step's loss (the dense ones agree) and time (compilation, not in the
statistics), the median and min of --steps timed steps (each ends when the loss is on the host), tokens/s from
the median. The ratio ours / torch is of tokens/s measured in this same run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("ours-nf4", "ours-dense", "torch-dense", "torch-bnb")
SHAPES = dict(
    model_type="qwen3_moe",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
SMOKE = dict(
    SHAPES,
    vocab_size=128,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0)
LEARNING_RATE, MAX_GRAD_NORM, SEED = 2e-4, 1.0, 0


def _limit_threads(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _timed(step, steps: int) -> dict:
    start = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"first_loss": first_loss, "first_step_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def _tokens(vocab: int, batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(SEED).integers(0, vocab, (batch, seq))


def run_ours(model_dir: Path, args, quantized: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.lora import LoraConfig, apply_lora
    from qlora_jax.models import ComputeOptions
    from qlora_jax.quant import QuantConfig
    from qlora_jax.train.optim import OptimConfig, make_optimizer
    from qlora_jax.train.step import TrainState, make_train_step

    model, config = load_pretrained(model_dir, quantization=QuantConfig() if quantized else None, dtype=jnp.float32)
    apply_lora(model, LoraConfig(**LORA, target_modules="all-linear"), rngs=nnx.Rngs(SEED))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(
        OptimConfig(learning_rate=LEARNING_RATE, schedule="constant", max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0),
        100,
    )
    state = [TrainState.create(lora, optimizer)]
    step = make_train_step(
        graphdef,
        optimizer,
        chunk_size=1024,
        options=ComputeOptions(remat="none"),
        packed_rows=False,
        router_aux_loss_coef=0.0,
    )
    tokens = _tokens(config.vocab_size, args.batch, args.seq).astype(np.int32)[None]
    targets = np.concatenate([tokens[..., 1:], np.full((1, args.batch, 1), -100, np.int32)], axis=-1)
    batch = {
        "tokens": tokens,
        "targets": targets,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(SEED)

    def one() -> float:
        state[0], metrics = step(state[0], base, batch, key)
        return float(metrics["loss"])

    return _timed(one, args.steps)


def run_torch(model_dir: Path, args, quantized: bool) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    kwargs = dict(dtype=torch.float32)
    if quantized:
        kwargs.update(
            device_map="cpu",
            quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    torch.manual_seed(SEED)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    tokens = torch.tensor(_tokens(model.config.vocab_size, args.batch, args.seq))

    def one() -> float:
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return _timed(one, args.steps)


def child(name: str, model_dir: Path, args) -> None:
    _limit_threads(args.threads)
    run = {
        "ours-nf4": lambda: run_ours(model_dir, args, True),
        "ours-dense": lambda: run_ours(model_dir, args, False),
        "torch-dense": lambda: run_torch(model_dir, args, False),
        "torch-bnb": lambda: run_torch(model_dir, args, True),
    }[name]
    result = run()
    result["tokens_per_s"] = args.batch * args.seq / result["median_s"]
    print(json.dumps(result))


def _save_model(directory: Path, shapes: dict) -> None:
    import torch
    import transformers

    fields = dict(shapes)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(SEED)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)


def _versions() -> dict:
    out = {}
    for package in ("jax", "flax", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step (checks the script)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 16, 1
    if args.child:
        child(args.child, Path(args.model), args)
        return 0
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", JAX_PLATFORMS="cpu")
    results = {
        "shapes": SMOKE if args.smoke else SHAPES,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "versions": _versions(),
        "configs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        _save_model(model_dir, results["shapes"])
        for name in args.configs.split(","):
            command = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--model",
                str(model_dir),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results["configs"][name] = json.loads(done.stdout.strip().splitlines()[-1])
    configs = results["configs"]
    for ours, theirs in (("ours-nf4", "torch-bnb"), ("ours-dense", "torch-dense"), ("ours-nf4", "torch-dense")):
        if ours in configs and theirs in configs:
            results[f"{ours} / {theirs}"] = configs[ours]["tokens_per_s"] / configs[theirs]["tokens_per_s"]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
