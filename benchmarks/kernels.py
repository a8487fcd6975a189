"""Fused 4-bit matmul vs bf16 `jnp.dot` vs dequantize-then-dot, forward and forward+backward, in one run.

    python benchmarks/kernels.py                      # the full table on a GPU
    python benchmarks/kernels.py --smoke --interpret  # tiny shapes, Pallas interpreter: checks the script on CPU

For every M in {1, 16, 128, 512, 2048, 8192} and (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336),
(8192, 8192)}: median time of each implementation, TFLOP/s, effective GB/s (bytes the op must move: activations,
outputs and the weight as stored), the fraction of the GPU's roofline, and speedups relative to bf16 `jnp.dot`.
The fused kernels use the autotuned configuration (tuned in this run when the cache lacks the shape).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import KernelOptions, nf4_matmul
from qlora_jax.quant import quantize

MS = (1, 16, 128, 512, 2048, 8192)
NKS = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192))
# Dense bf16 tensor-core TFLOP/s and HBM TB/s, from NVIDIA's data sheets (SXM parts).
PEAKS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.04)}


def peaks(device_kind: str) -> tuple[float, float] | None:
    return next((p for name, p in PEAKS.items() if name in device_kind), None)


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_shape(m, n, k, *, repeats, interpret, device_peaks):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.bfloat16)
    qt = quantize(w)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    options = KernelOptions(interpret=interpret)
    impls = {
        "bf16 dot": lambda a: jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(a.dtype),
        "dequant+dot": functools.partial(nf4_matmul, qt=qt, options=options, impl="xla"),
        "fused nf4": functools.partial(nf4_matmul, qt=qt, options=options, impl="pallas"),  # autotuned tile sizes
        "auto": functools.partial(
            nf4_matmul, qt=qt, options=options, impl="auto"
        ),  # whichever of the two measured faster
    }
    rows = []
    for name, matmul in impls.items():
        forward = jax.jit(matmul)

        @jax.jit
        def forward_backward(a, g, matmul=matmul):
            y, vjp = jax.vjp(matmul, a)
            return y, vjp(g)[0]

        t_fwd = median_time(forward, x, repeats=repeats)
        t_fb = median_time(forward_backward, x, dy, repeats=repeats)
        weight_bytes = w.nbytes if name == "bf16 dot" else qt.nbytes
        act_bytes = x.nbytes + m * n * 2  # read x, write y
        for phase, t, flops, moved in (
            ("fwd", t_fwd, 2 * m * n * k, weight_bytes + act_bytes),
            ("fwd+bwd", t_fb, 4 * m * n * k, 2 * weight_bytes + 2 * act_bytes),
        ):
            row = dict(m=m, n=n, k=k, impl=name, phase=phase, time_us=t * 1e6, tflops=flops / t / 1e12,
                       gbps=moved / t / 1e9)  # fmt: skip
            if device_peaks:
                peak_tflops, peak_tbps = device_peaks
                roofline_s = max(flops / (peak_tflops * 1e12), moved / (peak_tbps * 1e12))
                row["roofline_fraction"] = roofline_s / t
            rows.append(row)
    return rows


def add_ratios(rows):
    base = {(r["m"], r["n"], r["k"], r["phase"]): r["time_us"] for r in rows if r["impl"] == "bf16 dot"}
    dequant = {(r["m"], r["n"], r["k"], r["phase"]): r["time_us"] for r in rows if r["impl"] == "dequant+dot"}
    for r in rows:
        key = (r["m"], r["n"], r["k"], r["phase"])
        r["speedup_vs_bf16"] = base[key] / r["time_us"]
        r["speedup_vs_dequant"] = dequant[key] / r["time_us"]


def print_table(rows):
    print("| M | N x K | phase | impl | time (us) | TFLOP/s | GB/s | roofline | vs bf16 dot | vs dequant+dot |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        roof = f"{r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "-"
        print(f"| {r['m']} | {r['n']} x {r['k']} | {r['phase']} | {r['impl']} | {r['time_us']:.1f} | "
              f"{r['tflops']:.1f} | {r['gbps']:.0f} | {roof} | {r['speedup_vs_bf16']:.2f}x | "
              f"{r['speedup_vs_dequant']:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (M 1 and 64, N x K 256 x 512)")
    parser.add_argument("--interpret", action="store_true", help="run the fused kernels in the Pallas interpreter")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = jax.devices()[0]
    if device.platform != "gpu" and not args.interpret:
        parser.error("the fused kernels need a GPU; on CPU pass --interpret (numbers are then meaningless)")
    device_peaks = peaks(device.device_kind) if device.platform == "gpu" else None
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; {platform.node()}")
    shapes = [(m, n, k) for m in (1, 64) for n, k in ((256, 512),)] if args.smoke else [
        (m, n, k) for n, k in NKS for m in MS
    ]  # fmt: skip
    rows = []
    for m, n, k in shapes:
        rows += run_shape(m, n, k, repeats=args.repeats, interpret=args.interpret, device_peaks=device_peaks)
    add_ratios(rows)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": device.device_kind, "jax": jax.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
