"""The GPU path measured in one command: kernels, a Llama-3.1-8B-shape QLoRA step, decoding, and the PyTorch stack.

    python benchmarks/gpu.py --out gpu-results        # one H100/H200: at most ~10 minutes, no network
    python benchmarks/gpu.py --smoke --out /tmp/gs    # CPU, Pallas interpreter, tiny shapes: checks the script (CI)

Every section runs in its own process under a time limit (the limits of the sections that run add up to --budget
seconds) and appends JSON lines to OUT/results.jsonl as it goes, so a section that fails or runs out of time costs
only itself and what it measured survives. Sections run most important first, and inside a section the rows that
decide something come before the variations, so a cut (a section's limit, or the device's time running out) takes
the least important. At the end OUT/report.md (tables) and OUT/results.json (every record) are written.

Sections (--sections picks some, in this order):
  correct   every selectable fused kernel on the device against the float32 reference: each kernel once (every op
            and M, NF4 + double quant, bf16), then the quant variants and dtypes, then each configuration of
            the tuning spaces
  kernels   M <= 16 (decode) rows: bf16 jnp.dot, dequantize + dot, the decode kernel's configs, the tiled split-K
            kernel, "auto"; each timed as many calls inside one jit on weights distinct per call (unrolled; one
            row also as a lax.scan over the stacked weights, as a model's layer scan runs it), with GB/s and the
            fraction of the roofline; writes "choice" records for `python -m qlora_jax.kernels.tables`
  decode    greedy generation, 8B shape, batch 1 and 8: prefill and the decode loop timed apart; tokens/s for NF4 by
            XLA and by the decode kernel, and the bf16 model, beside the roofline and beside bf16
  ckpt      a random Llama-3.1-8B-shape bf16 checkpoint written as safetensors (in --scratch) for the train rows
  train     one process per --train-row: `load_pretrained` (timed), LoRA r16 on all linears, AdamW, step time,
            tokens/s, XLA's memory analysis and the process's real peak (loading included)
  large     M >= 2048 (training) rows, forward and forward + backward
  torch     transformers + PEFT (+ bitsandbytes 4-bit when importable) on the same shapes: step, peak, decode
  ladder    the decode kernel built up one step at a time (docs/kernels.md), GB/s of each rung
  moe       a Qwen3-30B-A3B-shape QLoRA step (examples/qwen3-30b-a3b/config.json; docs/moe.md): random NF4 weights
            made on the device (no checkpoint), LoRA r16 on attention, 1 x 2048 tokens, remat full: compile time,
            XLA's memory analysis, step time, tokens/s, peak
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# (section, share of the time budget)
SECTIONS = (
    ("correct", 30),
    ("kernels", 80),
    ("decode", 70),
    ("ckpt", 35),
    ("train", 145),
    ("large", 45),
    ("torch", 55),
    ("ladder", 25),
    ("moe", 120),
)
QWEN3_30B_A3B = ROOT / "examples" / "qwen3-30b-a3b" / "config.json"
TINY_MOE = dict(
    model_type="qwen3_moe",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)
DEFAULT_TRAIN_ROWS = ("base=nf4,batch=2,length=2048,remat=full", "base=bf16,batch=2,length=2048,remat=full")
SMOKE_TRAIN_ROWS = ("base=nf4,batch=2,length=16,remat=none,steps=1",)
LLAMA_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)
TINY = dict(
    LLAMA_8B,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
# Dense bf16 tensor-core FLOP/s and HBM bytes/s (NVIDIA's SXM data sheets) for the roofline column.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}
DECODE_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))


class Recorder:
    """Appends one JSON object a line to OUT/results.jsonl (flushed: a killed process keeps what it wrote)."""

    def __init__(self, out: Path, section: str):
        self.path, self.section = out / "results.jsonl", section

    def __call__(self, kind: str, **record) -> dict:
        record = {"section": self.section, "kind": kind, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(json.dumps(record, default=str), flush=True)
        return record


# --- sections (each runs in a child process) -------------------------------------------------------------------


def _env(emit, args):
    import jax

    device = jax.devices()[0]
    emit(
        "env",
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=device.device_kind,
        cores=getattr(device, "core_count", None),
        smoke=args.smoke,
    )
    return device


def _cores() -> int:
    from qlora_jax import gpu_target

    return gpu_target.device_facts().sm_count


def _peaks(device_kind: str):
    return next((p for name, p in PEAKS.items() if name in device_kind), None)


def _rel_error(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def correct_order(ops, variants, dtypes) -> list[tuple]:
    """(op, m, variant, dtype) for `correct`: each (op, m) with the first variant and dtype (every kernel the run
    can choose is checked once), then the other variants and dtypes of each."""
    first = [(op, m, variants[0], dtypes[0]) for op, m in ops]
    rest = [(op, m, v, d) for op, m in ops for v in variants for d in dtypes if (op, m, v, d) not in first]
    return first + rest


def section_correct(args, emit):
    """Each selectable fused kernel against the float32 reference, on the device (relative to the largest output;
    16-bit outputs are within their rounding, ~4e-3 for bf16)."""
    import jax
    import jax.numpy as jnp

    from qlora_jax import gpu_target
    from qlora_jax.kernels import autotune, dispatch
    from qlora_jax.kernels.dequant import dequantize_pallas
    from qlora_jax.kernels.matmul import matmul_reference, matmul_transposed_reference
    from qlora_jax.kernels.timing import distinct_weights
    from qlora_jax.quant import dequantize

    _env(emit, args)
    n, k = (96, 512) if args.smoke else (1024, 4096)
    limit = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}

    def check(op, m, dtype, quant_type, double_quant, config):
        qt = jax.tree.map(
            lambda a: a[0], distinct_weights(n, k, dtype, 1, quant_type=quant_type, double_quant=double_quant, seed=m)
        )
        rows = jax.random.normal(jax.random.key(m), (m, k if op == "forward" else n), jnp.float32).astype(dtype)
        ref = matmul_reference if op == "forward" else matmul_transposed_reference
        got = jax.jit(dispatch.fused_fn(op, config, args.smoke))(rows, qt)
        err = _rel_error(got, ref(rows, qt))
        emit(
            "correct",
            op=op,
            m=m,
            n=n,
            k=k,
            dtype=jnp.dtype(dtype).name,
            quant=quant_type,
            double_quant=double_quant,
            kernel=type(config).__name__,
            config=str(config),
            rel_error=err,
            ok=bool(err <= limit[jnp.dtype(dtype).name]),
        )

    variants = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int4", True)]
    dtypes = [jnp.bfloat16, jnp.float16, jnp.float32]
    ops = (("forward", 1), ("forward", 7), ("forward", 16), ("forward", 300), ("backward", 300))
    if args.smoke:  # the interpreter is slow: one case of each kernel
        variants, dtypes, ops = [("fp4", False)], [jnp.float32], (("forward", 1), ("forward", 40), ("backward", 40))
    sms = gpu_target.device_facts().sm_count
    for case in correct_order(ops, variants, dtypes):  # every kernel once first: a cut takes only variations
        op, m, (quant_type, dq), dtype = case
        check(op, m, dtype, quant_type, dq, autotune.default_fused_config(op, m, n, k, 64, sms))
    qt = jax.tree.map(lambda a: a[0], distinct_weights(n, k, jnp.bfloat16, 1))
    got = jax.jit(lambda q: dequantize_pallas(q, jnp.bfloat16, interpret=args.smoke))(qt)
    emit(
        "correct",
        op="dequantize",
        n=n,
        k=k,
        mismatches=int(jnp.sum(got != dequantize(qt))),
        ok=bool(jnp.all(got == dequantize(qt))),
    )
    for op, m in (("forward", 4),) if args.smoke else ops:
        space = autotune.tuning_space(op, m, n, k, 64)
        for config in space[-1:] if args.smoke else space:  # smoke: the tiled split-K kernel
            check(op, m, jnp.bfloat16, "nf4", True, config)


def _time_impls(
    args, emit, m, n, k, impls, *, phase, peaks, dense_bytes, quant_bytes, weights, rows, mode="unrolled", extra=None
):
    """Times each (name, fn, uses_dense_weight) and emits one record each; returns {name: seconds}. Each call reads
    its own weight: `weights` holds (stack, count) per kind, as many distinct weights as calls are timed."""
    import jax

    from qlora_jax.kernels.timing import per_call_seconds

    results = {}
    flops = (2 if phase == "fwd" else 4) * m * n * k
    for name, fn, dense in impls:
        stack, count = weights["dense" if dense else "quant"]
        distinct = jax.tree.leaves(stack)[0].shape[0]
        record = dict(
            m=m, n=n, k=k, impl=name, phase=phase, mode=mode, copies=count, distinct_weights=distinct, **(extra or {})
        )
        try:
            seconds = per_call_seconds(fn, rows, stack, count, mode=mode, repeats=1 if args.smoke else 5)
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            emit("timing", **record, error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        moved = (dense_bytes if dense else quant_bytes) * (1 if phase == "fwd" else 2)
        record.update(time_us=seconds * 1e6, weight_GBps=moved / seconds / 1e9, tflops=flops / seconds / 1e12)
        if peaks:
            record["roofline_fraction"] = max(flops / peaks[0], moved / peaks[1]) / seconds
        results[name] = seconds
        emit("timing", **record)
    return results


def _weights(n, k, count, seed=0, *, dense_count=None):
    """{"quant": (stack, count), "dense": (stack, count)}: distinct 4-bit and bf16 weights, each kind as many as its
    calls are timed (`count` 4-bit ones; bf16 ones enough to fill timing.TARGET_BYTES by their own size, 4x the
    4-bit size: never fewer than the calls, so no call re-reads a weight from L2), and the bytes of one of each."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.kernels.timing import copies_for, distinct_weights

    dense_count = dense_count or (count if count <= 2 else copies_for(n * k * 2))
    quant = distinct_weights(n, k, jnp.bfloat16, count, seed=seed)
    dense = distinct_weights(n, k, jnp.bfloat16, dense_count, seed=seed, dense=True)
    quant_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(quant)) // count
    return {"quant": (quant, count), "dense": (dense, dense_count)}, quant_bytes, n * k * 2


def _emit_choice(emit, device_kind, op, m, n, k, times, configs):
    """A tuning-cache entry from this run's timings (fused only if one measured faster than XLA)."""
    from qlora_jax.kernels import autotune

    if "dequant+dot" not in times:
        return
    candidates = {"xla": times["dequant+dot"]} | {name: times[name] for name in configs if name in times}
    key = autotune.TuningKey(op, device_kind, autotune.m_bucket(m), n, k, "bfloat16", "nf4", 64, True)
    choice = autotune.tune(key, {name: (lambda t=t: t) for name, t in candidates.items()}, configs=configs)
    choice = dataclasses.replace(choice, source=f"measured: benchmarks/gpu.py {datetime.date.today()}")
    emit("choice", key=str(key), choice=choice.to_json())


def section_kernels(args, emit):
    import functools

    import jax
    import jax.numpy as jnp

    from qlora_jax.kernels import KernelOptions, autotune, dispatch, nf4_matmul, registry
    from qlora_jax.kernels.timing import copies_for

    device = _env(emit, args)
    peaks = _peaks(device.device_kind)
    interpret = args.smoke
    shapes = [(256, 512)] if args.smoke else DECODE_SHAPES
    ms = (1,) if args.smoke else (1, 4, 16)
    dense_dot = lambda a, w: jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(a.dtype)  # noqa: E731
    for n, k in shapes:
        count = 2 if args.smoke else copies_for(n * k // 2)
        weights, quant_bytes, dense_bytes = _weights(n, k, count)
        for m in ms:
            rows = (jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16),)
            configs = {}
            default = autotune.default_fused_config("forward", m, n, k, 64, _cores())
            candidates = [default, *autotune.tuning_space("forward", m, n, k, 64)]  # what `qlora-jax tune` times
            if args.smoke:  # the interpreter is slow: the default decode config and one tiled split-K config
                candidates = [default, next(c for c in candidates if registry.config_name(c) == "matmul")]
            for config in dict.fromkeys(candidates):
                try:
                    config.check(m=m, n=n, k=k, blocksize=64)
                except ValueError:
                    continue
                configs[f"fused {config}"] = config
            impls = [
                ("bf16 dot", dense_dot, True),
                (
                    "dequant+dot",
                    functools.partial(nf4_matmul, options=KernelOptions(impl="xla", interpret=interpret)),
                    False,
                ),
                ("dequant(xla)+dot", functools.partial(dispatch.xla_forward, dequant="xla"), False),
            ]
            impls += [(name, dispatch.fused_fn("forward", c, interpret), False) for name, c in configs.items()]
            impls.append(("auto", functools.partial(nf4_matmul, options=KernelOptions(interpret=interpret)), False))
            times = _time_impls(
                args,
                emit,
                m,
                n,
                k,
                impls,
                phase="fwd",
                peaks=peaks,
                dense_bytes=dense_bytes,
                quant_bytes=quant_bytes,
                weights=weights,
                rows=rows,
            )
            _emit_choice(emit, device.device_kind, "forward", m, n, k, times, configs)
            if m == 1 and (n, k) == shapes[0]:  # what a model's scan over layers sees: per-layer slices
                scan = [impl for impl in impls if impl[0] in ("bf16 dot", "dequant+dot")]
                scan.append((next(iter(configs)), dispatch.fused_fn("forward", default, interpret), False))
                _time_impls(
                    args,
                    emit,
                    m,
                    n,
                    k,
                    scan,
                    phase="fwd",
                    peaks=peaks,
                    dense_bytes=dense_bytes,
                    quant_bytes=quant_bytes,
                    weights=weights,
                    rows=rows,
                    mode="scan",
                )
        del weights


def section_large(args, emit):
    import functools

    import jax
    import jax.numpy as jnp

    from qlora_jax.kernels import KernelOptions, MatmulConfig, dispatch, nf4_matmul

    device = _env(emit, args)
    peaks = _peaks(device.device_kind)
    interpret = args.smoke
    rows_spec = [(64, 256, 512)] if args.smoke else [(2048, 4096, 4096), (8192, 4096, 4096), (2048, 14336, 4096)]
    dense_dot = lambda a, w: jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(a.dtype)  # noqa: E731
    for m, n, k in rows_spec:
        count = 2 if args.smoke else 4  # compute-bound rows: a few distinct weights, as many of each kind
        weights, quant_bytes, dense_bytes = _weights(n, k, count, dense_count=count)
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        dy = jax.random.normal(jax.random.key(1), (m, n), jnp.float32).astype(jnp.bfloat16)
        tiles = (
            MatmulConfig(block_m=64, block_n=64, block_k=64),
            MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8),
        )
        fused = {f"fused {c}": c for c in tiles}
        xla = functools.partial(nf4_matmul, options=KernelOptions(impl="xla"))
        forward = [("bf16 dot", dense_dot, True), ("dequant+dot", xla, False)]
        if args.smoke:
            fused = dict(list(fused.items())[:1])
        forward += [(name, dispatch.fused_fn("forward", c, interpret), False) for name, c in fused.items()]
        forward.append(("auto", functools.partial(nf4_matmul, options=KernelOptions(interpret=interpret)), False))
        times = _time_impls(
            args,
            emit,
            m,
            n,
            k,
            forward,
            phase="fwd",
            peaks=peaks,
            dense_bytes=dense_bytes,
            quant_bytes=quant_bytes,
            weights=weights,
            rows=(x,),
        )
        _emit_choice(emit, device.device_kind, "forward", m, n, k, times, fused)

        def with_backward(f, dense=False):
            def run(a, g, w):
                if dense:
                    y, vjp = jax.vjp(lambda b: dense_dot(b, w), a)
                else:
                    y, vjp = jax.vjp(lambda b: f(b, w), a)
                return y, vjp(g)[0]

            return run

        both = [("bf16 dot", with_backward(None, dense=True), True)]
        for name, options in (
            ("dequant+dot", KernelOptions(impl="xla")),
            ("fused default", KernelOptions(impl="pallas", interpret=interpret)),
            ("auto", KernelOptions(interpret=interpret)),
        ):
            both.append((name, with_backward(functools.partial(nf4_matmul, options=options)), False))
        _time_impls(
            args,
            emit,
            m,
            n,
            k,
            both,
            phase="fwd+bwd",
            peaks=peaks,
            dense_bytes=dense_bytes,
            quant_bytes=quant_bytes,
            weights=weights,
            rows=(x, dy),
        )
        del weights


def section_ladder(args, emit):
    import functools

    import jax
    import jax.numpy as jnp
    from decode_ladder import LADDER, ladder  # benchmarks/decode_ladder.py, beside this script

    from qlora_jax.kernels import autotune
    from qlora_jax.kernels.timing import copies_for

    device = _env(emit, args)
    peaks = _peaks(device.device_kind)
    n, k = (256, 512) if args.smoke else (14336, 4096)
    count = 2 if args.smoke else copies_for(n * k // 2)
    weights, quant_bytes, dense_bytes = _weights(n, k, count)
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.float32).astype(jnp.bfloat16)
    base = autotune.default_fused_config("forward", 1, n, k, 64, _cores())
    impls = []
    for stage, what in enumerate(LADDER):
        for lookup in ("gather", "select") if stage in (2, 4) and not args.smoke else (base.lookup,):
            for dot in ("fma", "mma") if stage == 4 and not args.smoke else (base.dot,):
                config = dataclasses.replace(base, lookup=lookup, dot=dot)
                fn = functools.partial(ladder, config=config, stage=stage, interpret=args.smoke)
                impls.append((f"{stage}: {what} ({lookup}, {dot})", fn, False))
    _time_impls(
        args,
        emit,
        1,
        n,
        k,
        impls,
        phase="fwd",
        peaks=peaks,
        dense_bytes=dense_bytes,
        quant_bytes=quant_bytes,
        weights=weights,
        rows=(x,),
        extra={"ladder": True},
    )


def _model_config(args):
    from qlora_jax.models import ModelConfig

    return ModelConfig.from_hf_config(TINY if args.smoke else LLAMA_8B, source="gpu.py")


def _generation_seconds(graphdef, state, inputs, cache_length, options, sampling):
    """(prefill seconds, decode-loop seconds, tokens generated by the shortest row) of one greedy generation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.generate import decode, prefill

    start = time.perf_counter()
    logits, cache, position = prefill(graphdef, state, *inputs, cache_length=cache_length, options=options)
    jax.block_until_ready(logits)
    middle = time.perf_counter()
    stop_ids = jnp.asarray(sampling.stop_token_ids, jnp.int32)
    seen = jnp.zeros((logits.shape[0], 0), bool)  # greedy: no repetition penalty
    out, lengths, _ = decode(graphdef, state, logits, cache, position, stop_ids, seen, config=sampling, options=options)
    jax.block_until_ready(out)
    return middle - start, time.perf_counter() - middle, int(np.min(np.asarray(lengths)))


def section_decode(args, emit):
    """Greedy generation, 8B shape, batch 1 and 8: the prompt's prefill and the decode loop (`generate.prefill`,
    `generate.decode`, each one compiled program) timed apart, for NF4 by XLA (what "auto" runs untuned), NF4 by
    the decode kernel (impl="pallas"; Mosaic GPU's too where jax has it), and the bf16 model, in one run; tokens/s
    beside the roofline (bytes a token must read / the chip's bandwidth) and beside bf16."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax.decode_budget import roofline_bytes
    from qlora_jax.generate import SamplingConfig
    from qlora_jax.kernels import KernelOptions, registry
    from qlora_jax.models import ComputeOptions, DecoderLM, KVCache
    from qlora_jax.quant import QuantConfig

    device = _env(emit, args)
    peaks = _peaks(device.device_kind)
    config = _model_config(args)
    prompt_len, new = (8, 4) if args.smoke else (128, 128)
    # the decode kernel's row first: a cut by the time limit takes the baselines
    rows = [("nf4", "pallas", "decode"), ("nf4", "xla", "decode"), ("bf16", "xla", "decode")]
    if registry.by_name("decode_mosaic").unavailable() is None and not args.smoke:  # jax >= 0.11
        rows.insert(1, ("nf4", "pallas", "decode_mosaic"))
    batches = (1,) if args.smoke else (1, 8)
    built = None
    for base, impl, kernel in rows:
        try:
            if built is None or built[0] != base:
                built = None  # free the previous model first
                quant = QuantConfig() if base == "nf4" else None
                start = time.perf_counter()
                model = nnx.jit(
                    lambda q=quant: DecoderLM(
                        config, quant=q, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
                    )
                )()
                jax.block_until_ready(nnx.state(model))
                built = (base, model)
                emit("model", base=base, init_s=time.perf_counter() - start)
            model = built[1]
            graphdef, state = nnx.split(model)
            options = ComputeOptions(kernels=KernelOptions(impl=impl, decode_kernel=kernel, interpret=args.smoke))
            sampling = SamplingConfig(max_new_tokens=new, stop_token_ids=(-1,))
            for batch in batches:
                prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, prompt_len))
                inputs = (jnp.asarray(prompts, jnp.int32), jnp.ones((batch, prompt_len), bool))
                run = functools.partial(
                    _generation_seconds, graphdef, state, inputs, prompt_len + new, options, sampling
                )
                first = run()  # compiles both programs
                prefill_s, decode_s, generated = min((run() for _ in range(1 if args.smoke else 3)), key=lambda t: t[1])
                cache = jax.eval_shape(lambda b=batch: KVCache.empty(config, b, prompt_len + new, jnp.bfloat16))
                roofline = roofline_bytes(model, cache, batch)  # bytes a token must read (the whole cache)
                record = dict(base=base, impl=impl, kernel=kernel, batch=batch, prompt=prompt_len)
                record.update(new_tokens=generated, compile_s=first[0] + first[1], prefill_s=prefill_s)
                record.update(decode_s=decode_s, tokens_per_s=batch * generated / decode_s)
                record.update(roofline_GB_per_token=roofline / 1e9)
                if peaks:
                    record["roofline_tokens_per_s"] = batch * peaks[1] / roofline
                    record["roofline_fraction"] = record["tokens_per_s"] / record["roofline_tokens_per_s"]
                emit("decode", **record)
        except Exception as e:  # noqa: BLE001
            emit("decode", base=base, impl=impl, kernel=kernel, error=f"{type(e).__name__}: {str(e)[:300]}")


def section_ckpt(args, emit):
    """A random bf16 checkpoint of the model's shape (values N(0, 0.02), drawn once and cut at random offsets:
    fast, and as NF4-friendly as real weights), written as transformers does, shard by shard."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from qlora_jax.convert.hf import save_pretrained  # noqa: F401 - imported to fail early if the package is broken

    hf = TINY if args.smoke else LLAMA_8B
    directory = Path(args.scratch) / "model"
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << (16 if args.smoke else 26), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    d, inter, heads, kv = (
        hf["hidden_size"],
        hf["intermediate_size"],
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
    )
    head = d // heads
    shapes = {
        "model.embed_tokens.weight": (hf["vocab_size"], d),
        "lm_head.weight": (hf["vocab_size"], d),
        "model.norm.weight": (d,),
    }
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv * head, d),
            p + "self_attn.v_proj.weight": (kv * head, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }

    def tensor(shape):
        size = int(np.prod(shape))
        if len(shape) == 1:
            return np.ones(shape, ml_dtypes.bfloat16)
        if size > pool.size:
            return np.resize(pool, size).reshape(shape)
        start = int(rng.integers(0, pool.size - size + 1))
        return pool[start : start + size].reshape(shape)

    shard, shard_bytes, index, files = {}, 0, {}, 0
    for name, shape in shapes.items():
        shard[name] = tensor(shape)
        shard_bytes += shard[name].nbytes
        if shard_bytes > 4 * 2**30 or name == next(reversed(shapes)):
            files += 1
            filename = f"model-{files:05d}.safetensors"
            save_file(shard, str(directory / filename), metadata={"format": "pt"})
            index |= {key: filename for key in shard}
            shard, shard_bytes = {}, 0
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (directory / "config.json").write_text(json.dumps(dict(hf, architectures=["LlamaForCausalLM"])))
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    emit("ckpt", path=str(directory), files=files, GB=size / 1e9, write_s=time.perf_counter() - start)


def parse_row(spec: str) -> dict:
    """'base=nf4,batch=2,length=2048,remat=full,attention_block=512,kernels.impl=xla' -> a train row.

    base (nf4 | bf16), batch, length, steps, packed (true: the step takes packed rows, segment ids honoured;
    default false, one example per row as the PyTorch baseline trains) and dropout_rng (a jax key implementation,
    default threefry2x32) are the row's; every other key is a field of ComputeOptions (`kernels.X`: of
    KernelOptions), passed through as given (ints and true/false converted), so rows can set levers this script
    does not know about. Raises ValueError naming an unknown key or a bad value."""
    from qlora_jax.kernels import KernelOptions
    from qlora_jax.models import ComputeOptions
    from qlora_jax.train.config import DROPOUT_RNGS

    row = {
        "base": "nf4",
        "batch": 2,
        "length": 2048,
        "steps": 3,
        "packed": False,
        "dropout_rng": "threefry2x32",
        "compute": {},
        "kernels": {},
        "spec": spec,
    }
    compute_fields = {f.name for f in dataclasses.fields(ComputeOptions)} - {"kernels"}
    kernel_fields = {f.name for f in dataclasses.fields(KernelOptions)} - {"interpret", "cache"}
    for item in filter(None, spec.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"train row {spec!r}: {item!r} is not key=value")
        value = {"true": True, "false": False}.get(text.lower(), int(text) if text.lstrip("-").isdigit() else text)
        if key in ("batch", "length", "steps"):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train row {spec!r}: {key} must be a positive integer, got {text!r}")
            row[key] = value
        elif key == "base":
            if value not in ("nf4", "bf16"):
                raise ValueError(f"train row {spec!r}: base must be nf4 or bf16, got {text!r}")
            row[key] = value
        elif key == "packed":
            if not isinstance(value, bool):
                raise ValueError(f"train row {spec!r}: packed must be true or false, got {text!r}")
            row[key] = value
        elif key == "dropout_rng":
            if value not in DROPOUT_RNGS:
                raise ValueError(f"train row {spec!r}: dropout_rng must be one of {DROPOUT_RNGS}, got {text!r}")
            row[key] = value
        elif key.startswith("kernels.") and key[8:] in kernel_fields:
            row["kernels"][key[8:]] = value
        elif key in compute_fields:
            row["compute"][key] = value
        else:
            known = sorted(
                {"base", "batch", "length", "steps", "packed", "dropout_rng"}
                | compute_fields
                | {f"kernels.{f}" for f in kernel_fields}
            )
            raise ValueError(f"train row {spec!r}: unknown key {key!r} (known: {', '.join(known)})")
    ComputeOptions(**row["compute"], kernels=KernelOptions(**row["kernels"]))  # validates the values
    return row


def section_train(args, emit):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.kernels import KernelOptions
    from qlora_jax.lora import LoraConfig, apply_lora
    from qlora_jax.models import ComputeOptions
    from qlora_jax.quant import QuantConfig
    from qlora_jax.train.loss import auto_chunk_size
    from qlora_jax.train.optim import OptimConfig, make_optimizer
    from qlora_jax.train.step import TrainState, make_train_step

    device = _env(emit, args)
    row = parse_row(args.row)
    path = Path(args.scratch) / "model"
    if not (path / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {path}: the ckpt section did not finish")
    start = time.perf_counter()
    model, config = load_pretrained(
        path, quantization=QuantConfig() if row["base"] == "nf4" else None, dtype=jnp.bfloat16
    )
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - start
    apply_lora(model, LoraConfig(**LORA, target_modules="all-linear"), rngs=nnx.Rngs(1))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    del model
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    optimizer = make_optimizer(OptimConfig(learning_rate=2e-4, schedule="constant", max_grad_norm=1.0), 100)
    state = TrainState.create(lora, optimizer)
    options = ComputeOptions(**row["compute"], kernels=KernelOptions(**row["kernels"], interpret=args.smoke))
    step = make_train_step(
        graphdef, optimizer, chunk_size=auto_chunk_size(config.vocab_size), options=options, packed_rows=row["packed"]
    )
    batch, length = row["batch"], row["length"]
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, length), dtype=np.int32)
    targets = np.concatenate([tokens[..., 1:], np.full((1, batch, 1), -100, np.int32)], axis=-1)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    arrays = dict(tokens=tokens, targets=targets, positions=positions, segment_ids=np.ones_like(tokens))
    data = {name: jnp.asarray(value) for name, value in arrays.items()}
    key = jax.random.key(0, impl=row["dropout_rng"])
    start = time.perf_counter()
    compiled = step.lower(state, base, data, key).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    xla = (
        {}
        if analysis is None
        else {
            "xla_argument_GiB": analysis.argument_size_in_bytes / 2**30,
            "xla_temp_GiB": analysis.temp_size_in_bytes / 2**30,
            "xla_output_GiB": analysis.output_size_in_bytes / 2**30,
            "xla_alias_GiB": analysis.alias_size_in_bytes / 2**30,
        }
    )
    state, metrics = compiled(state, base, data, key)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(row["steps"]):
        start = time.perf_counter()
        state, metrics = compiled(state, base, data, key)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    stats = device.memory_stats() or {}
    median = statistics.median(times)
    emit(
        "train",
        spec=row["spec"],
        base=row["base"],
        batch=batch,
        length=length,
        compute=row["compute"],
        kernels=row["kernels"],
        load_s=load_s,
        compile_s=compile_s,
        step_s=times,
        median_s=median,
        tokens_per_s=batch * length / median,
        first_loss=first_loss,
        last_loss=float(metrics["loss"]),
        base_GiB=base_bytes / 2**30,
        peak_GiB=stats.get("peak_bytes_in_use", 0) / 2**30,
        **xla,
    )


def section_torch(args, emit):
    import functools
    import importlib.util

    missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        emit("torch", skipped=f"not installed: {', '.join(missing)}")
        return
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        emit("torch", skipped="no CUDA device for torch")
        return
    device = "cuda" if cuda else "cpu"
    hf = {k: v for k, v in (TINY if args.smoke else LLAMA_8B).items() if k not in ("model_type", "torch_dtype")}
    row = parse_row(args.train_rows[0])
    batch, length = row["batch"], row["length"]
    modes = ["bf16"] + (["bnb-nf4"] if cuda and importlib.util.find_spec("bitsandbytes") else [])
    if "bnb-nf4" not in modes:
        emit("torch", mode="bnb-nf4", skipped="bitsandbytes not importable" if cuda else "needs CUDA")
    for mode in modes:
        try:
            config = transformers.LlamaConfig(**hf)
            config._attn_implementation = "sdpa"
            torch.manual_seed(0)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            torch.set_default_dtype(torch.bfloat16)
            with torch.device(device):
                model = transformers.LlamaForCausalLM(config)
            torch.set_default_dtype(torch.float32)
            if mode == "bnb-nf4":
                model = _to_bnb_4bit(model)
            init_s = time.perf_counter() - start
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            model = peft.get_peft_model(model, peft.LoraConfig(**LORA, target_modules=targets, task_type="CAUSAL_LM"))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
            tokens = torch.randint(0, config.vocab_size, (batch, length), device=device)
            step = functools.partial(_torch_step, model, tokens, params, opt)
            first_loss, times = step(), []
            for _ in range(1 if args.smoke else 3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            emit(
                "torch",
                mode=mode,
                batch=batch,
                length=length,
                init_s=init_s,
                step_s=times,
                median_s=median,
                tokens_per_s=batch * length / median,
                first_loss=first_loss,
                peak_GiB=peak,
                torch=torch.__version__,
                transformers=transformers.__version__,
                peft=peft.__version__,
            )
            model.eval()
            del step, opt
            new = 4 if args.smoke else 32
            for decode_batch in (1,) if args.smoke else (1, 8):
                prompt = torch.randint(0, config.vocab_size, (decode_batch, 8 if args.smoke else 128), device=device)
                with torch.no_grad():
                    model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                    start = time.perf_counter()
                    model.generate(input_ids=prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                    if cuda:
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                emit(
                    "torch-decode",
                    mode=mode,
                    batch=decode_batch,
                    new_tokens=new,
                    seconds=seconds,
                    tokens_per_s=decode_batch * new / seconds,
                )
            del model
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            emit("torch", mode=mode, error=f"{type(e).__name__}: {str(e)[:300]}")


def _random_state(state, key):
    """Random arrays for an abstract model state: 4-bit codes and absmax codes uniform, nested absmax and offsets
    a typical 0.01 (weights of ~N(0, 0.02)), everything else N(0, 0.02): the speed does not depend on the values."""
    import itertools

    import jax
    import jax.numpy as jnp

    counter = itertools.count()

    def fill(path, leaf):
        k, name = jax.random.fold_in(key, next(counter)), jax.tree_util.keystr(path)
        if leaf.dtype == jnp.uint8:
            return jax.jit(lambda k: jax.random.randint(k, leaf.shape, 0, 256, jnp.int32).astype(jnp.uint8))(k)
        if "nested_absmax" in name or "offset" in name:
            return jnp.full(leaf.shape, 0.01, leaf.dtype)
        return jax.jit(lambda k: (0.02 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype))(k)

    return jax.tree_util.tree_map_with_path(fill, state)


def section_moe(args, emit):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax.lora import LoraConfig, apply_lora
    from qlora_jax.models import ComputeOptions, DecoderLM, ModelConfig
    from qlora_jax.nn import QuantizedWeight
    from qlora_jax.quant import QuantConfig
    from qlora_jax.train.loss import auto_chunk_size
    from qlora_jax.train.optim import OptimConfig, make_optimizer
    from qlora_jax.train.step import TrainState, make_train_step

    device = _env(emit, args)
    fields = TINY_MOE if args.smoke else json.loads(QWEN3_30B_A3B.read_text())
    config = ModelConfig.from_hf_config(fields, source="gpu.py moe")
    batch, length, steps = (1, 16, 1) if args.smoke else (1, 2048, 3)

    def build():
        model = DecoderLM(config, quant=QuantConfig(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        apply_lora(
            model,
            LoraConfig(r=16, lora_alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
            rngs=nnx.Rngs(1),
        )
        return model

    abstract = nnx.eval_shape(build)
    graphdef, lora, base = nnx.split(abstract, nnx.LoRAParam, ...)
    start = time.perf_counter()
    lora, base = _random_state(lora, jax.random.key(1)), _random_state(base, jax.random.key(2))
    jax.block_until_ready((lora, base))
    init_s = time.perf_counter() - start
    quantized = nnx.state(nnx.merge(graphdef, lora, base), QuantizedWeight)
    optimizer = make_optimizer(OptimConfig(learning_rate=2e-4, schedule="constant", max_grad_norm=1.0), 100)
    state = TrainState.create(lora, optimizer)
    options = ComputeOptions(remat="full")  # (the grouped expert matmuls are XLA; no Pallas interpreter in smoke)
    step = make_train_step(
        graphdef, optimizer, chunk_size=auto_chunk_size(config.vocab_size), options=options, packed_rows=False
    )
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, length), dtype=np.int32)
    targets = np.concatenate([tokens[..., 1:], np.full((1, batch, 1), -100, np.int32)], axis=-1)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    data = {
        k: jnp.asarray(v)
        for k, v in dict(tokens=tokens, targets=targets, positions=positions, segment_ids=np.ones_like(tokens)).items()
    }
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, base, data, key).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    xla = (
        {}
        if analysis is None
        else {
            "xla_argument_GiB": analysis.argument_size_in_bytes / 2**30,
            "xla_temp_GiB": analysis.temp_size_in_bytes / 2**30,
        }
    )
    state, metrics = compiled(state, base, data, key)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, base, data, key)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    stats = device.memory_stats() or {}
    emit(
        "moe",
        model="Qwen3-30B-A3B shape" if not args.smoke else "tiny",
        batch=batch,
        length=length,
        init_s=init_s,
        compile_s=compile_s,
        step_s=times,
        median_s=median,
        tokens_per_s=batch * length / median,
        first_loss=first_loss,
        base_4bit_GiB=sum(x.nbytes for x in jax.tree.leaves(quantized)) / 2**30,
        peak_GiB=stats.get("peak_bytes_in_use", 0) / 2**30,
        **xla,
    )


def _torch_step(model, tokens, params, opt) -> float:
    import torch

    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _to_bnb_4bit(model):
    """Every nn.Linear but lm_head -> bitsandbytes Linear4bit (nf4, double quant, bf16 compute), on the GPU."""
    import bitsandbytes as bnb
    import torch

    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                setattr(module, child_name, q.to("cuda"))
    torch.cuda.empty_cache()
    return model


CHILDREN = {
    "correct": section_correct,
    "kernels": section_kernels,
    "large": section_large,
    "ladder": section_ladder,
    "decode": section_decode,
    "ckpt": section_ckpt,
    "train": section_train,
    "torch": section_torch,
    "moe": section_moe,
}


# --- the parent: runs each section under its limit, then writes the report -------------------------------------


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def _with_bf16_ratio(records: list[dict]) -> list[dict]:
    """Decode records with `vs_bf16`: tokens/s over the bf16 model's at the same batch, in the same run."""
    bf16 = {
        r["batch"]: r["tokens_per_s"]
        for r in records
        if r["kind"] == "decode" and r.get("base") == "bf16" and "tokens_per_s" in r
    }
    out = []
    for r in records:
        if r["kind"] == "decode" and r.get("tokens_per_s") and bf16.get(r.get("batch")):
            r = dict(r, vs_bf16=r["tokens_per_s"] / bf16[r["batch"]])
        out.append(r)
    return out


def report(records: list[dict]) -> str:
    """The markdown tables of a run's records."""
    records = _with_bf16_ratio(records)
    lines = ["# benchmarks/gpu.py", ""]
    env = next((r for r in records if r["kind"] == "env"), {})
    head = next((r for r in records if r["kind"] == "run"), {})
    lines.append(
        f"{env.get('device', '?')} ({env.get('backend', '?')}), jax {env.get('jax', '?')}; "
        f"{head.get('date', '')}; smoke={head.get('smoke')}"
    )
    lines += ["", "## Sections", "", "| section | status | seconds | limit |", "|---|---|---|---|"]
    for r in (r for r in records if r["kind"] == "section"):
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('seconds'))} | {r.get('limit_s')} |")
    correct = [r for r in records if r["kind"] == "correct"]
    if correct:
        bad = [r for r in correct if not r.get("ok")]
        lines += ["", f"## Correctness: {len(correct) - len(bad)} of {len(correct)} within tolerance", ""]
        for r in bad:
            lines.append(
                f"- FAILED {r.get('op')} m{r.get('m')} {r.get('dtype')} {r.get('quant')} "
                f"dq={r.get('double_quant')} {r.get('config', '')}: {r.get('rel_error', r)}"
            )
    timings = [r for r in records if r["kind"] == "timing"]
    if timings:
        lines += [
            "",
            "## Kernels (per call; weights distinct per call)",
            "",
            "| M | N x K | phase | mode | impl | time (us) | weight GB/s | roofline | vs bf16 dot | vs dequant+dot |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = {(r["m"], r["n"], r["k"], r["phase"], r["mode"], r["impl"]): r.get("time_us") for r in timings}
        for r in timings:
            shape = (r["m"], r["n"], r["k"], r["phase"], r["mode"])
            t = r.get("time_us")
            ratios = [base.get((*shape, name)) for name in ("bf16 dot", "dequant+dot")]
            ratios = [f"{b / t:.2f}x" if b and t else "-" for b in ratios]
            value = _fmt(t) if t else f"error: {r.get('error', '')[:60]}"
            lines.append(
                f"| {r['m']} | {r['n']} x {r['k']} | {r['phase']} | {r['mode']} | {r['impl']} | {value} | "
                f"{_fmt(r.get('weight_GBps'), 0)} | {_fmt(r.get('roofline_fraction'), 2)} | "
                f"{ratios[0]} | {ratios[1]} |"
            )
    for kind, title, cols in (
        (
            "decode",
            "Decode (greedy; prefill timed apart)",
            (
                "base",
                "impl",
                "kernel",
                "batch",
                "prompt",
                "new_tokens",
                "prefill_s",
                "tokens_per_s",
                "roofline_tokens_per_s",
                "roofline_fraction",
                "vs_bf16",
            ),
        ),
        (
            "train",
            "QLoRA step, Llama-3.1-8B shape",
            (
                "spec",
                "load_s",
                "compile_s",
                "median_s",
                "tokens_per_s",
                "first_loss",
                "base_GiB",
                "xla_argument_GiB",
                "xla_temp_GiB",
                "peak_GiB",
            ),
        ),
        (
            "torch",
            "transformers + PEFT",
            ("mode", "batch", "length", "median_s", "tokens_per_s", "peak_GiB", "skipped"),
        ),
        ("torch-decode", "transformers generate", ("mode", "batch", "new_tokens", "tokens_per_s")),
        (
            "moe",
            "QLoRA step, Qwen3-30B-A3B shape (mixture of experts)",
            (
                "model",
                "batch",
                "length",
                "compile_s",
                "median_s",
                "tokens_per_s",
                "base_4bit_GiB",
                "xla_temp_GiB",
                "peak_GiB",
            ),
        ),
    ):
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            lines += ["", f"## {title}", "", "| " + " | ".join(cols) + " | error |", "|---" * (len(cols) + 1) + "|"]
            for r in rows:
                cells = [_fmt(r.get(c), 3) if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
                lines.append("| " + " | ".join(cells) + f" | {r.get('error', '')[:80]} |")
    errors = [r for r in records if r["kind"] == "section" and r["status"] != "ok"]
    for r in errors:
        lines += ["", f"### {r['name']}: {r['status']}", "", "```", r.get("stderr_tail", "")[-2000:], "```"]
    return "\n".join(lines) + "\n"


def section_jobs(wanted: list[str], train_rows: list[str], budget: float) -> list[tuple[str, list[str], int]]:
    """(section, extra arguments, time limit in seconds) of each process to run, in SECTIONS' order: the budget is
    shared by the sections that run (by their SECTIONS shares), the train section's share by its rows."""
    shares = {name: share for name, share in SECTIONS if name in wanted}
    total = sum(shares.values())
    jobs = []
    for name, share in shares.items():
        limit = budget * share / total
        if name == "train":
            jobs += [(name, ["--row", row], max(10, int(limit / len(train_rows)))) for row in train_rows]
        else:
            jobs.append((name, [], max(10, int(limit))))
    return jobs


# The checkpoint of the train rows is ~16 GB for the 8B shape: more than a GPU machine's small disk has.
_SCRATCH_NEED = 20 * 2**30


def scratch_root(need: int = _SCRATCH_NEED) -> str | None:
    """/dev/shm (host memory) when it has `need` bytes free, else the default temporary directory (None)."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= need:
            return str(shm)
    except OSError:
        pass
    return None


def run_sections(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if results.exists():
        results.rename(out / f"results.{int(time.time())}.jsonl")  # keep an earlier run's records
    emit = Recorder(out, "parent")
    emit(
        "run",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        argv=sys.argv,
        host=platform.node(),
        smoke=args.smoke,
        budget_s=args.budget,
    )
    wanted = args.sections.split(",") if args.sections else [name for name, _ in SECTIONS]
    unknown = set(wanted) - set(CHILDREN)
    if unknown:
        raise SystemExit(f"gpu.py: unknown sections {sorted(unknown)}; known: {', '.join(CHILDREN)}")
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="qlora_gpu_", dir=scratch_root()))
    env = dict(os.environ)
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
        # bitsandbytes' CPU ops go through torch.compile, which compiles every new shape: minutes on a CPU.
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
    try:
        for name, extra, limit in section_jobs(wanted, args.train_rows, args.budget):
            limit = 300 if args.smoke else limit
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                name,
                "--out",
                str(out),
                "--scratch",
                str(scratch),
                *extra,
            ]
            command += ["--train-rows", *args.train_rows] + (["--smoke"] if args.smoke else [])
            start = time.perf_counter()
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit, cwd=ROOT)
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
                tail = done.stderr[-3000:] if done.returncode else ""
            except subprocess.TimeoutExpired as e:
                status, tail = f"cut at its {limit} s limit", (e.stderr or b"")[-3000:]
                tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            label = name + (f" [{extra[1]}]" if extra else "")
            emit(
                "section",
                name=label,
                status=status,
                seconds=time.perf_counter() - start,
                limit_s=limit,
                stderr_tail=tail,
            )
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    (out / "results.json").write_text(json.dumps(records, indent=1, default=str))
    (out / "report.md").write_text(report(records))
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and {results}")
    failed = [r["name"] for r in records if r["kind"] == "section" and r["status"] != "ok"]
    if failed:
        print(f"sections not completed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and args.smoke else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for results.jsonl, results.json and report.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, Pallas interpreter (checks the script)")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {', '.join(CHILDREN)}")
    parser.add_argument("--budget", type=float, default=579.0, help="seconds shared by the sections' limits")
    parser.add_argument(
        "--train-rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help="train rows, e.g. base=nf4,batch=2,length=2048,remat=full,attention_block=512,"
        "kernels.impl=xla (ComputeOptions fields pass through)",
    )
    parser.add_argument(
        "--scratch",
        default=None,
        help="where the checkpoint is written (default: a temporary "
        "directory in /dev/shm when it has 20 GiB free, else in the system's temporary directory)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.train_rows = args.train_rows or list(SMOKE_TRAIN_ROWS if args.smoke else DEFAULT_TRAIN_ROWS)
    try:
        for row in args.train_rows:
            parse_row(row)
    except ValueError as e:
        parser.error(str(e))
    if args.child:
        emit = Recorder(Path(args.out), args.child)
        try:
            CHILDREN[args.child](args, emit)
        except Exception as e:
            emit("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            raise
        return 0
    return run_sections(args)


if __name__ == "__main__":
    sys.exit(main())
