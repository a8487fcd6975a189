"""What each part of a QLoRA training step costs, as ratios against a baseline step measured in the same run.

    python benchmarks/step_levers.py [--hidden 512] [--layers 2] [--batch 2] [--seq 512] [--reps 5] [--json out.json]
                                     [--only baseline,dropout-rbg,...]

A random Llama-shaped model (hidden, 3.5 x hidden MLP, heads of 64, 4 query heads per key/value head, 32k vocabulary)
with its linear weights in NF4 (double quantization), LoRA r=16 alpha=32 dropout=0.05 on every linear layer, AdamW
with clipping; one batch of packed rows (two examples a row). The compute dtype is float32 on CPU (XLA:CPU's
bfloat16 matmuls are slow) and bfloat16 elsewhere.

Variants of the step, each compiled once and then timed in turns (rep 1 of every variant, then rep 2, ...), so
drifting machine load hits all alike; the figure is each variant's median step time over the baseline's:

  baseline          dropout keys threefry2x32, remat full, attention auto, loss chunk by vocabulary
  dropout-rbg       LoRA dropout's random bits from an rbg key (XLA's RngBitGenerator) instead of threefry
  dropout-unsafe    ... from an unsafe_rbg key
  dropout-philox    ... from a philox4x32 key (counter-based, like threefry)
  no-dropout        lora_dropout 0: what dropout costs in all
  remat-none, remat-save_dots   the other checkpointing policies
  chunk-256, chunk-whole        the lm-head + cross-entropy in chunks of 256 tokens, or all tokens at once
  attention-xla0    the XLA attention over all queries at once (no query blocks)
  attention-pallas, attention-cudnn   (GPU only) the flash attention paths

Two micro-benchmarks beside the step: the optimizer update alone (AdamW + clipping + the non-finite guard over
the adapters, as a fraction of the baseline step) and the adapters' A projections of q, k and v: three [M, D] x
[D, r] products against one [M, D] x [D, 3r] (forward and backward; only valid without dropout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.models import ComputeOptions, DecoderLM, ModelConfig
from qlora_jax.quant import QuantConfig
from qlora_jax.train.loss import IGNORE_INDEX, auto_chunk_size
from qlora_jax.train.optim import OptimConfig, make_optimizer
from qlora_jax.train.step import TrainState, make_train_step

VOCAB = 32000


def _model_config(hidden: int, layers: int) -> ModelConfig:
    heads = max(hidden // 64, 4)
    return ModelConfig.from_hf_config(
        dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=hidden * 7 // 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 4,
            rope_theta=5e5,
            max_position_embeddings=8192,
        ),
        source="step_levers",
    )


def _batch(batch: int, seq: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (1, batch, seq), dtype=np.int32)
    half = seq // 2 + 3
    segments = np.where(np.arange(seq) < half, 1, 2).astype(np.int32)
    positions = np.where(np.arange(seq) < half, np.arange(seq), np.arange(seq) - half).astype(np.int32)
    targets = np.roll(tokens, -1, axis=-1)
    targets[..., [half - 1, seq - 1]] = IGNORE_INDEX
    shape = tokens.shape
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(targets),
        "positions": jnp.asarray(np.broadcast_to(positions, shape)),
        "segment_ids": jnp.asarray(np.broadcast_to(segments, shape)),
    }


def _variants(on_gpu: bool, tokens: int) -> dict[str, dict]:
    base = dict(dropout=0.05, rng="threefry2x32", options=ComputeOptions(remat="full"), chunk=auto_chunk_size(VOCAB))
    out = {
        "baseline": base,
        "dropout-rbg": base | {"rng": "rbg"},
        "dropout-unsafe": base | {"rng": "unsafe_rbg"},
        "dropout-philox": base | {"rng": "philox4x32"},
        "no-dropout": base | {"dropout": 0.0},
        "remat-none": base | {"options": ComputeOptions(remat="none")},
        "remat-save_dots": base | {"options": ComputeOptions(remat="save_dots")},
        "chunk-256": base | {"chunk": 256},
        "chunk-whole": base | {"chunk": tokens},
        "attention-xla0": base | {"options": ComputeOptions(remat="full", attention="xla", attention_block=0)},
    }
    if on_gpu:
        out["attention-pallas"] = base | {"options": ComputeOptions(remat="full", attention="pallas")}
        out["attention-cudnn-unpacked"] = base | {
            "options": ComputeOptions(remat="full", attention="auto"),
            "packed_rows": False,
        }
    return out


def _time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _adapter_projections(m: int, d: int, r: int, dtype, reps: int) -> dict[str, float]:
    """Three x @ A_i.T against one x @ concat(A).T, value and gradient (in x and the A's)."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, d), dtype)
    a = [jax.random.normal(k, (r, d), jnp.float32) * 0.02 for k in keys[1:]]

    def separate(x, a):
        return sum(jnp.sum(jnp.dot(x, ai.astype(dtype).T).astype(jnp.float32) ** 2) for ai in a)

    def fused(x, a):
        out = jnp.dot(x, jnp.concatenate(a).astype(dtype).T).astype(jnp.float32)
        return sum(jnp.sum(part**2) for part in jnp.split(out, 3, axis=-1))

    result = {}
    for name, f in (("separate", separate), ("fused", fused)):
        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        jax.block_until_ready(g(x, a))
        result[name] = statistics.median(_time(lambda g=g: g(x, a), reps))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated variant names (baseline is always run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    config = _model_config(args.hidden, args.layers)
    model = DecoderLM(config, quant=QuantConfig(), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    batch = _batch(args.batch, args.seq)
    tokens = args.batch * args.seq
    variants = _variants(on_gpu, tokens)
    if args.only:
        wanted = {"baseline", *args.only.split(",")}
        variants = {k: v for k, v in variants.items() if k in wanted}
    optim = OptimConfig(learning_rate=2e-4, schedule="constant", max_grad_norm=1.0)
    optimizer = make_optimizer(optim, 100)

    steps, first_loss = {}, {}
    for name, v in variants.items():
        m = nnx.clone(model)
        apply_lora(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=v["dropout"]), rngs=nnx.Rngs(1))
        graphdef, lora, base = nnx.split(m, nnx.LoRAParam, ...)
        step = make_train_step(
            graphdef, optimizer, chunk_size=v["chunk"], options=v["options"], packed_rows=v.get("packed_rows", True)
        )
        key = jax.random.key(0, impl=v["rng"])
        state = TrainState.create(lora, optimizer)
        started = time.perf_counter()
        state, metrics = step(state, base, batch, key)
        first_loss[name] = float(metrics["loss"])
        print(f"{name}: compiled and ran once in {time.perf_counter() - started:.1f}s", flush=True)
        steps[name] = [step, state, base, key]

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, entry in steps.items():
            step, state, base, key = entry
            started = time.perf_counter()
            state, metrics = step(state, base, batch, key)
            float(metrics["loss"])
            times[name].append(time.perf_counter() - started)
            entry[1] = state

    adapters = steps["baseline"][1].lora
    opt_state = steps["baseline"][1].opt_state

    @jax.jit
    def update(adapters, opt_state):
        grads = jax.tree.map(jnp.ones_like, adapters)
        finite = jnp.isfinite(optax.tree.norm(grads))
        updates, new_state = optimizer.update(grads, opt_state, adapters)
        new = optax.apply_updates(adapters, updates)
        keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)  # noqa: E731
        return keep(new, adapters), keep(new_state, opt_state)

    jax.block_until_ready(update(adapters, opt_state))
    update_s = statistics.median(_time(lambda: update(adapters, opt_state), args.reps))
    heads_dim = config.head_dim * config.num_heads
    projections = _adapter_projections(tokens, heads_dim, 16, dtype, args.reps)

    base_median = statistics.median(times["baseline"])
    rows = []
    print(f"\n{'variant':<26}{'median s':>10}{'min s':>9}{'vs baseline':>13}{'first loss':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            dict(variant=name, median_s=med, min_s=min(ts), ratio=med / base_median, first_loss=first_loss[name])
        )
        print(f"{name:<26}{med:>10.3f}{min(ts):>9.3f}{med / base_median:>12.3f}x{first_loss[name]:>12.5f}")
    print(
        f"\noptimizer update alone (AdamW + clip + guard over the adapters): {update_s * 1e3:.2f} ms, "
        f"{update_s / base_median:.1%} of the baseline step"
    )
    print(
        f"q/k/v adapter A projections, value and gradient, M={tokens} D={heads_dim} r=16: three separate "
        f"{projections['separate'] * 1e3:.2f} ms, one fused {projections['fused'] * 1e3:.2f} ms "
        f"({projections['separate'] / projections['fused']:.2f}x)"
    )
    machine = dict(
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        cpus=len(os.sched_getaffinity(0)),
        platform=platform.platform(),
        jax=jax.__version__,
        python=platform.python_version(),
    )
    print(machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    args=vars(args),
                    machine=machine,
                    steps=rows,
                    optimizer_update_s=update_s,
                    adapter_projections_s=projections,
                ),
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
