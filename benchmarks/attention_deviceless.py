"""Attention on an H100/H200, seen from a machine without one: each implementation's forward + backward compiled
by XLA:GPU for the target (deviceless, `qlora_jax.gpu_target`), with its device memory and the work it does.

    python benchmarks/attention_deviceless.py [--target h200] [--lengths 2048 8192 32768] [--json out.json]

Llama-3.1-8B's attention (32 query heads, 8 key/value heads, head_dim 128, bfloat16), one row of T tokens: the
XLA path (`attend`, queries in blocks of 512, a [T, T] bool mask), cuDNN's fused flash attention (causal, one
example a row), and our Pallas flash-attention kernel with packed segments (what `attention: auto` takes for packed
rows). Reported: XLA:GPU's temporaries and arguments of the compiled fwd+bwd, the score-matrix FLOPs each path
computes (the XLA path computes every [block, T] product and masks; the flash paths skip the key blocks past the
diagonal: about half), and, for the Pallas kernels, registers, spills and programs per SM (ptxas). Nothing runs:
the times these imply are not measured (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _fwd_bwd(impl: str, length: int):
    import jax
    import jax.numpy as jnp

    from qlora_jax.kernels.flash_attention import flash_attention
    from qlora_jax.models.attention import attend, attention_mask

    scale = HEAD_DIM**-0.5

    def attention(q, k, v, segments):
        if impl == "xla":
            index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (1, length))
            mask = attention_mask(index, index, q_segments=segments, k_segments=segments)
            return attend(q, k, v, mask, scale=scale, block_size=512)
        if impl == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        return flash_attention(q, k, v, scale=scale, q_segments=segments, k_segments=segments)

    def loss(q, k, v, segments):
        return jnp.sum(attention(q, k, v, segments).astype(jnp.float32))

    q = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv, segments)


def score_flops(impl: str, length: int) -> float:
    """FLOPs of the score-matrix products (QK^T and PV forward; dS, dQ, dK, dV backward: 2 + 5 products)."""
    pairs = length * length if impl == "xla" else length * (length + 1) / 2  # flash: causal blocks only (about)
    return 7 * 2 * pairs * HEAD_DIM * HEADS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="h200", choices=("h100", "h200"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from qlora_jax import gpu_target

    if reason := gpu_target.deviceless_unavailable_reason():
        raise SystemExit(f"attention_deviceless.py: {reason}")
    resources = gpu_target.kernel_resources_unavailable_reason() is None
    rows = []
    print("| T | implementation | temporaries | score GFLOPs | Pallas kernels (registers, spills, programs/SM) |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        for impl in ("xla", "cudnn", "pallas"):
            fn, inputs = _fwd_bwd(impl, length)
            compiled = gpu_target.compile_for_target(fn, *inputs, target=args.target)
            memory = gpu_target.GpuMemory.of(compiled)
            kernels = []
            if impl == "pallas" and resources:
                kernels = [k for k in gpu_target.compiled_kernels(fn, *inputs, target=args.target) if k.pallas]
            row = dict(
                length=length,
                impl=impl,
                temp_bytes=memory.temp_bytes,
                argument_bytes=memory.argument_bytes,
                score_gflops=score_flops(impl, length) / 1e9,
                kernels=[str(k) for k in kernels],
            )
            rows.append(row)
            described = (
                "; ".join(
                    f"{k.name} {k.registers} regs, {'spills' if k.spills else 'no spills'}, {k.programs_per_sm}/SM"
                    for k in kernels
                )
                or "-"
            )
            print(
                f"| {length} | {impl} | {memory.temp_bytes / 2**20:,.1f} MiB | {row['score_gflops']:,.0f} | "
                f"{described} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
