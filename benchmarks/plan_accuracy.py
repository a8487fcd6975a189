"""How close `qlora-jax plan` comes to XLA's analysis of the full compiled training step.

    python benchmarks/plan_accuracy.py [--layers 12] [--json out.json]

A Llama-shaped model (hidden 256, 8 heads, 4 KV heads, MLP 768, vocab 8192; only a config.json, nothing is
materialized), NF4 base, LoRA r=8 on all linear layers, bfloat16 compute, for every remat policy and two batch
shapes. The plan counts stored parts from shapes and extrapolates activations from 2- and 4-layer compiles; the
reference compiles the full depth.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax

from qlora_jax.train.config import config_from_dict
from qlora_jax.train.plan import plan_memory

MODEL = dict(
    model_type="llama",
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_attention_heads=8,
    num_key_value_heads=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SHAPES = ((4, 256), (2, 1024))  # (batch, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.layers} layers")
    print("| remat | batch x length | plan | XLA (full step) | plan error | saved activations/layer | time |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text(json.dumps(MODEL | {"num_hidden_layers": args.layers}))
        for remat in ("none", "full", "save_dots"):
            for batch, length in SHAPES:
                config = config_from_dict(
                    {
                        "model": {"path": directory, "quant": "nf4", "dtype": "bfloat16"},
                        "data": {"train": "unused.jsonl", "max_length": length},
                        "lora": {"r": 8},
                        "train": {"batch_size": batch, "remat": remat, "loss_chunk_size": 512},
                    }
                )
                started = time.perf_counter()
                plan = plan_memory(config, compare=True)
                elapsed = time.perf_counter() - started
                error = plan.device_total / plan.compiled.total - 1
                rows.append(
                    {
                        "remat": remat,
                        "batch": batch,
                        "length": length,
                        "plan": plan.device_total,
                        "xla": plan.compiled.total,
                        "error": error,
                    }
                )
                print(
                    f"| {remat} | {batch} x {length} | {plan.device_total / 2**20:.1f} MiB | "
                    f"{plan.compiled.total / 2**20:.1f} MiB | {error:+.2%} | "
                    f"{plan.saved_activations_per_layer / 2**20:.2f} MiB | {elapsed:.0f} s |"
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
