"""Memory cost of QLoRA at 7-8B scale, for every supported family and checkpoint policy.

    python benchmarks/cost.py [--families llama mistral ...] [--remat none full ...] [--attention-block 512]
                              [--loss-chunk 0] [--compare] [--json out.json] [--plot cost.png]

Each family at its nearest published size to 8B, from the model's own config.json figures (written here; nothing is
downloaded and no weight is materialized: the model is abstract). The run: NF4 + double quantization, LoRA r=16
(alpha 32) on all linear layers, AdamW, bfloat16 compute, one sequence of 2048 tokens per step. Reported per row:
the bytes of the base weights (4-bit linears; embeddings, norms and lm_head in bfloat16), of the adapters and of
the optimizer state, counted exactly, and the peak of one training step from `qlora_jax.train.plan.plan_memory`
(activations from 2- and 4-layer compiles, extrapolated; `--compare` also compiles the full depth and reports
XLA's own figure). The compiles run on whatever backend jax has: on CPU these are XLA:CPU's buffer assignments, a
proxy for XLA:GPU's, and the `offload` policy has no separate host memory to offload to (so it is left out there).
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

# config.json fields of each family's model (the fields the loader reads), as published on the Hugging Face Hub.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": (
        "Llama-3.1-8B",
        dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "mistral": (
        "Mistral-7B-v0.3",
        dict(
            model_type="mistral",
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=32768,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "Qwen2.5-7B",
        dict(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=131072,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3": (
        "Qwen3-8B",
        dict(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=40960,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "gemma2": (
        "Gemma-2-9B",
        dict(
            model_type="gemma2",
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3": (
        "Gemma-3-12B",
        dict(
            model_type="gemma3_text",
            vocab_size=262208,
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            sliding_window_pattern=6,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling=dict(rope_type="linear", factor=8.0),
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=131072,
            tie_word_embeddings=True,
        ),
    ),
    "phi3": (
        "Phi-3-medium-4k (14B)",
        dict(
            model_type="phi3",
            vocab_size=32064,
            hidden_size=5120,
            intermediate_size=17920,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=10,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            sliding_window=2047,
            tie_word_embeddings=False,
        ),
    ),
}
POLICIES = ("none", "full", "save_dots", "offload")
GIB = 2**30


def training_config(model_dir: str, remat: str, attention_block: int, loss_chunk: int) -> dict:
    return {
        "model": {"path": model_dir, "quant": "nf4", "dtype": "bfloat16"},
        "data": {"train": "unused.jsonl", "max_length": 2048},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "train": {"batch_size": 1, "remat": remat, "attention_block": attention_block, "loss_chunk_size": loss_chunk},
    }


def measure(family: str, remat: str, args: argparse.Namespace, directory: Path) -> dict:
    name, hf = FAMILIES[family]
    model_dir = directory / family
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(hf))
    started = time.perf_counter()
    config = config_from_dict(training_config(str(model_dir), remat, args.attention_block, args.loss_chunk))
    plan = plan_memory(config, compare=args.compare)
    return {
        "family": family,
        "model": name,
        "remat": remat,
        "attention_block": args.attention_block,
        "loss_chunk_size": args.loss_chunk,
        "base_4bit": plan.quantized_weights,
        "base_dense": plan.dense_weights,
        "adapters": plan.adapters,
        "optimizer": plan.optimizer_state,
        "saved_activations": plan.saved_activations,
        "host_activations": plan.host_activations,
        "working_set": plan.working_set,
        "batch": plan.batch,
        "device_total": plan.device_total,
        "xla_full_step": plan.compiled.total if plan.compiled else None,
        "seconds": time.perf_counter() - started,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [p for p in POLICIES if any(r["remat"] == p for r in rows)]
    remat = "full" if "full" in policies else policies[0]
    shown = [r for r in rows if r["remat"] == remat]
    parts = [
        ("4-bit base", lambda r: r["base_4bit"]),
        ("16-bit embeddings/norms/head", lambda r: r["base_dense"]),
        ("adapters + AdamW", lambda r: r["adapters"] + r["optimizer"]),
        ("saved activations", lambda r: r["saved_activations"]),
        ("working set + batch", lambda r: r["working_set"] + r["batch"]),
    ]
    fig, (stack_ax, policy_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [r["model"] for r in shown]
    bottom = [0.0] * len(shown)
    for part, value in parts:
        heights = [value(r) / GIB for r in shown]
        stack_ax.bar(labels, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    stack_ax.axhspan(6, 10, color="grey", alpha=0.15, label="QLoRA paper: 7B in ~6-10 GB")
    stack_ax.axhline(7.4, color="black", linestyle="--", linewidth=1, label="torchtune: Llama-3.1-8B QLoRA 7.4 GiB")
    stack_ax.set_ylabel("GiB per training step")
    stack_ax.set_title(f"one step, seq 2048, batch 1, r=16, remat={remat}")
    stack_ax.tick_params(axis="x", rotation=30)
    stack_ax.set_ylim(0, max(bottom) * 1.45)  # room for the legend above the bars
    stack_ax.legend(fontsize=7, ncol=2, loc="upper left")
    width = 0.8 / len(policies)
    families = list(dict.fromkeys(r["model"] for r in rows))
    for i, policy in enumerate(policies):
        by_model = {r["model"]: r["device_total"] / GIB for r in rows if r["remat"] == policy}
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(families))]
        policy_ax.bar(xs, [by_model.get(m, 0.0) for m in families], width, label=f"remat={policy}")
    policy_ax.set_xticks(range(len(families)), families, rotation=30)
    policy_ax.set_ylabel("device peak, GiB")
    policy_ax.set_title("peak per checkpoint policy")
    policy_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--remat", nargs="+", default=None, choices=list(POLICIES), help="default: all, less offload on CPU"
    )
    parser.add_argument("--attention-block", type=int, default=512, help="train.attention_block (0: unblocked)")
    parser.add_argument("--loss-chunk", type=int, default=0, help="train.loss_chunk_size (0: by vocabulary)")
    parser.add_argument("--compare", action="store_true", help="also compile the full depth")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.remat is None:
        args.remat = [p for p in POLICIES if p != "offload" or jax.default_backend() != "cpu"]
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; seq 2048, batch 1, NF4+DQ, r=16 all-linear, "
        f"attention_block {args.attention_block}, loss_chunk_size {args.loss_chunk or 'auto'}"
    )
    print(
        "| model | remat | 4-bit base | 16-bit base | adapters | AdamW | saved activations | working set | "
        "device peak (plan) | XLA full step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for family in args.families:
            for remat in args.remat:
                r = measure(family, remat, args, Path(directory))
                rows.append(r)
                saved = f"{r['saved_activations'] / GIB:.2f}"
                if r["host_activations"]:
                    saved += f" (+{r['host_activations'] / GIB:.2f} host)"
                xla = f"{r['xla_full_step'] / GIB:.2f}" if r["xla_full_step"] else "-"
                print(
                    f"| {r['model']} | {remat} | {r['base_4bit'] / GIB:.2f} | {r['base_dense'] / GIB:.2f} | "
                    f"{r['adapters'] / 2**20:.0f} MiB | {r['optimizer'] / 2**20:.0f} MiB | {saved} | "
                    f"{r['working_set'] / GIB:.2f} | **{r['device_total'] / GIB:.2f}** | {xla} |",
                    flush=True,
                )
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2))
    print("(GiB unless marked)")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
