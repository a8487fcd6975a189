"""The `qlora-jax` command line: thin wrappers over the library, one function a command."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import qlora_jax
from qlora_jax.codebooks import BNB_QUANT_TYPES, QUANT_TYPES
from qlora_jax.gpu_target import SKIP_CHECK_ENV, TARGETS

# The flags' choices, without importing the modules that own them (jax, flax: seconds for `--help`);
# tests/test_cli_choices.py keeps each equal to its owner's.
QUANT_CHOICES = (*QUANT_TYPES, "none")  # train.config.QUANT_CHOICES: a 4-bit format, or none (a dense base)
DTYPES = ("bfloat16", "float16", "float32")  # train.config.COMPUTE_DTYPES
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert.gguf_export.TENSOR_TYPES


class CommandFailed(SystemExit):
    """A command's end with one message and an exit status (`status`): `main` prints the message on stderr (for
    status 1, Python's own handling of SystemExit does)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message if status == 1 else status)
        self.message, self.status = message, status
        self.agreed = False  # every process of a multi-process run ends this way at the same point

    def __str__(self) -> str:
        return self.message


def _fail(command: str, message: str, *, status: int = 1) -> CommandFailed:
    return CommandFailed(f"qlora-jax {command}: {message}", status)


def _inspect(args: argparse.Namespace) -> int:
    """Lists the 4-bit weights of a safetensors file and what they cost."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from qlora_jax.convert import bnb

    path = Path(args.path)
    if not path.is_file():
        raise _fail("inspect", f"{path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _fail("inspect", f"{path}: not a readable safetensors file ({e})") from e
    try:
        quantized, rest = bnb.split_state_dict(tensors)
    except bnb.BnbFormatError as e:
        raise _fail("inspect", f"{path}: {e}") from e
    print(f"{path}: {len(quantized)} 4-bit weights, {len(rest)} other tensors")
    q_params = q_bytes = 0
    for key, qt in quantized.items():
        q_params += qt.size
        q_bytes += qt.nbytes
        print(
            f"  {key:60s} {qt.quant_type} {str(qt.shape):>14s} blocksize={qt.blocksize:<5d} "
            f"{'dq' if qt.double_quant else '  '} {qt.bits_per_param:.3f} bits/param"
        )
    other_params = sum(v.size for v in rest.values())
    other_bytes = sum(v.nbytes for v in rest.values())
    if q_params:
        print(f"4-bit: {q_params:,} params in {q_bytes:,} bytes ({8 * q_bytes / q_params:.3f} bits/param)")
    print(f"other: {other_params:,} params in {other_bytes:,} bytes")
    return 0


def _quant_config(args: argparse.Namespace):
    from qlora_jax.quant import QuantConfig

    if args.quant == "none":
        return None
    return QuantConfig(quant_type=args.quant, blocksize=args.blocksize, double_quant=not args.no_double_quant)


def _load(command: str, args: argparse.Namespace):
    import jax.numpy as jnp

    from qlora_jax.convert.hf import load_pretrained

    try:
        model, config = load_pretrained(args.model, quantization=_quant_config(args), dtype=jnp.dtype(args.dtype))
        if args.resize_token_embeddings is not None:  # added tokens (before an adapter that trains their rows)
            from qlora_jax.tokens import resize_token_embeddings

            resize_token_embeddings(model, args.resize_token_embeddings)
            config = model.config
        return model, config
    except (ValueError, OSError) as e:
        raise _fail(command, str(e)) from e


def _generate(args: argparse.Namespace) -> int:
    from qlora_jax.generate import SamplingConfig, generate_text
    from qlora_jax.kernels import KernelOptions, autotune
    from qlora_jax.models import ComputeOptions
    from qlora_jax.models.generation_config import read_generation_config
    from qlora_jax.tokenizer import load_tokenizer

    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except ValueError as e:  # "temperature must be a finite number, got nan" -> "--temperature ..."
        raise _fail("generate", f"--{str(e).replace('_', '-')}") from e
    try:  # the checkpoint's generation defaults, refused before loading if qlora-jax cannot honour them
        sampling.resolved(read_generation_config(args.model))
    except ValueError as e:
        raise _fail("generate", str(e)) from e
    if empty := [i for i, prompt in enumerate(args.prompt) if not prompt.strip()]:
        raise _fail("generate", f"--prompt: prompt {empty[0] + 1} is empty; give the text to answer or complete")
    model, _ = _load_with_adapter("generate", args)
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except ValueError as e:
        raise _fail("generate", str(e)) from e
    prompts = args.prompt
    # the kernel choices measured on this machine (`qlora-jax tune`), read once
    options = ComputeOptions(kernels=KernelOptions(tuning=autotune.load_choices()))
    answers = generate_text(model, tokenizer, prompts, sampling, chat=not args.no_chat, options=options)
    for prompt, answer in zip(prompts, answers, strict=True):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0


def _convert(args: argparse.Namespace) -> int:
    """A transformers directory or GGUF file -> a transformers checkpoint, 4-bit (bitsandbytes) or dense."""
    from qlora_jax.convert.hf import save_pretrained
    from qlora_jax.files import check_output_directory, check_writable

    out = check_output_directory(args.output, "the output directory")  # before any work
    check_writable(out, "the output directory")
    model, _ = _load("convert", args)
    source = Path(args.model)
    with _published(out) as staging:  # everything appears at once, or nothing
        save_pretrained(model, staging, dequantize_weights=args.quant == "none", max_shard_size=args.max_shard_size)
        try:
            from qlora_jax.tokenizer import load_tokenizer

            load_tokenizer(source).save_pretrained(str(staging))
        except (ValueError, ImportError) as e:
            print(f"qlora-jax convert: no tokenizer written ({e})", file=sys.stderr)
    print(f"wrote {out}")
    return 0


@contextlib.contextmanager
def _published(output: str | Path) -> Iterator[Path]:
    """A staging directory for the checkpoint `output` (`files.staged_directory`); a write that fails in it (a full
    disk) is reported for `output`, which is as it was."""
    from qlora_jax.convert.safetensors_io import LAYOUT_FILES
    from qlora_jax.errors import OutputError
    from qlora_jax.files import output_error, staged_directory

    try:
        with staged_directory(output, replaces=LAYOUT_FILES) as staging:
            yield staging
    except OutputError as e:
        raise output_error(e.__cause__ or e, output) from e
    except OSError as e:  # the tokenizer's files, the publish itself
        raise output_error(e, output) from e


def _take_flag(args: argparse.Namespace, flag: str) -> bool:
    """True if `flag` was given (before the config, or among the overrides after it, where it is removed)."""
    given = getattr(args, flag.lstrip("-").replace("-", "_"))
    if flag in args.overrides:
        args.overrides = [item for item in args.overrides if item != flag]
        given = True
    return given


def _train(args: argparse.Namespace) -> int:
    from qlora_jax.errors import QloraJaxError
    from qlora_jax.train.config import load_config
    from qlora_jax.train.loop import train

    no_progress = _take_flag(args, "--no-progress")
    overwrite, break_lock = _take_flag(args, "--overwrite"), _take_flag(args, "--break-lock")
    config = load_config(args.config, args.overrides)
    try:
        result = train(config, progress=not no_progress, overwrite=overwrite, break_lock=break_lock)
    except ValueError as e:  # from a library below ours (tokenizer files, ...): its message names what
        if isinstance(e, QloraJaxError):
            raise
        raise _fail("train", str(e)) from e
    print(f"trained {result.steps} steps; outputs in {result.output_dir}")
    if result.exact_match_before is not None:
        print(f"eval exact match: {result.exact_match_before:.1%} before, {result.exact_match_after:.1%} after")
    return 0


def _take_option(args: argparse.Namespace, flag: str, choices: Sequence[str]) -> str | None:
    """The value of `flag` (before the config, or among the overrides after it, where it is removed)."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if flag in args.overrides:
        at = args.overrides.index(flag)
        given = args.overrides[at + 1 : at + 2]
        args.overrides = args.overrides[:at] + args.overrides[at + 2 :]
        value = given[0] if given else ""
    if value is not None and value not in choices:
        raise _fail(args.command, f"{flag}: choose one of {', '.join(choices)}, got {value!r}")
    return value


def _plan(args: argparse.Namespace) -> int:
    """The memory plan of a training config, from abstract shapes and compiled shallow steps (nothing loaded); for
    a GPU target, XLA:GPU's compile for it on this machine."""
    compare = _take_flag(args, "--compare")
    longest = _take_flag(args, "--longest-row")
    target = _take_option(args, "--target", sorted(TARGETS))
    if target is not None:  # before jax starts: the CUDA plugin then registers without CUDA libraries or a GPU
        os.environ.setdefault(SKIP_CHECK_ENV, "1")
    import jax

    from qlora_jax.gpu_target import deviceless_unavailable_reason, load_target
    from qlora_jax.train.config import load_config
    from qlora_jax.train.plan import longest_row, memory_budget, plan_memory

    if target is not None and (reason := deviceless_unavailable_reason()):
        raise _fail("plan", f"--target {target}: cannot compile for a GPU on this machine: {reason}")
    config = load_config(args.config, args.overrides)
    try:
        plan = plan_memory(config, compare=compare, target=target)
        if longest:
            budget, source = memory_budget(config, target=target)
            on_gpu = target is not None or jax.default_backend() != "cpu"
            policies = ["full"] + (["full_offload"] if on_gpu else [])
            rows = {p: longest_row(config, budget=budget, policy=p, target=target)[0] for p in policies}
    except ValueError as e:  # from a library below ours; errors raised on purpose are handled in main()
        raise _fail("plan", str(e)) from e
    t = config.train
    where = (
        f"on {jax.devices()[0].device_kind}"
        if target is None
        else (f"for {load_target(target).device_kind} (GPU target {target}, compiled here without it)")
    )
    print(
        f"{config.model.path}: {plan.num_layers} layers, {config.model.quant} base, LoRA r={config.lora.r}; "
        f"batch {t.batch_size} x {config.data.max_length} tokens (grad_accum {t.grad_accum}), remat={plan.remat}, "
        f"attention={t.attention}, {where}"
    )
    print(plan.table())
    if t.memory_budget is not None:
        print(f"memory budget (train.memory_budget): {plan.verdict(memory_budget(config)[0])}")
    if longest:
        for policy, length in rows.items():
            print(
                f"longest row within {budget / 2**30:.2f} GiB ({source}), remat={policy}, batch 1: "
                f"{length:,} tokens" + ("" if length else " (not even 1,024)")
            )
    return 0


def _int_list(text: str) -> list[int]:
    """ "1,8,16" -> [1, 8, 16]; raises ValueError for anything else."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def _tune(args: argparse.Namespace) -> int:
    """Measures the kernel choices of a training config's 4-bit linear shapes on this GPU; writes the cache."""
    from qlora_jax import gpu_target
    from qlora_jax.kernels import autotune
    from qlora_jax.kernels.tune_model import tune_shapes
    from qlora_jax.nn import linear_shapes
    from qlora_jax.train.build import abstract_model
    from qlora_jax.train.config import ConfigFieldError, load_config

    force, no_train = _take_flag(args, "--force"), _take_flag(args, "--no-train")
    for flag, convert in (("--decode-m", _int_list), ("--cache", str)):
        if flag in args.overrides:  # given after the config
            at = args.overrides.index(flag)
            value = args.overrides[at + 1 : at + 2]
            args.overrides = args.overrides[:at] + args.overrides[at + 2 :]
            try:
                setattr(args, flag[2:].replace("-", "_"), convert(value[0] if value else ""))
            except ValueError as e:
                raise _fail("tune", f"{flag}: {e}") from e
    try:
        config = load_config(args.config, args.overrides)
        model = abstract_model(config, num_layers=1)  # reads the model's config.json only
    except (ConfigFieldError, ValueError, OSError) as e:
        raise _fail("tune", str(e)) from e
    shapes = linear_shapes(model)
    if not shapes:
        raise _fail("tune", f"{args.config}: the model has no 4-bit linear layers (model.quant is none)")
    device = gpu_target.device_facts()
    if device.platform != "gpu":
        seen = f"{device.platform} devices ({device.device_kind})"
        raise _fail(
            "tune",
            f"no GPU: JAX sees only {seen}. Tuning times the kernels on the GPU that will run "
            "them; without one every shape runs XLA.",
        )
    t = config.train
    train_m = None if no_train else (t.batch_size // t.grad_accum) * config.data.max_length
    cache = autotune.TuningCache(Path(args.cache)) if args.cache else autotune.TuningCache()
    print(f"tuning {len(shapes)} weight shapes of {config.model.path} on {device.device_kind}; cache {cache.path}")
    tune_shapes(shapes, decode_ms=args.decode_m, train_m=train_m, cache=cache, force=force)
    print(f"wrote {cache.path}")
    return 0


def _load_with_adapter(command: str, args: argparse.Namespace):
    from qlora_jax.convert.peft import PeftFormatError, load_peft_adapter

    model, config = _load(command, args)
    if getattr(args, "adapter", None):
        try:
            load_peft_adapter(model, args.adapter)
        except PeftFormatError as e:
            raise _fail(command, str(e)) from e
    return model, config


def _merge(args: argparse.Namespace) -> int:
    """Base + PEFT adapter -> one transformers checkpoint (16-bit, or re-quantized to bitsandbytes 4-bit)."""
    import jax.numpy as jnp

    from qlora_jax.convert.merge import merge_and_save
    from qlora_jax.files import check_output_directory, check_output_file, check_writable
    from qlora_jax.quant import QuantConfig
    from qlora_jax.tokenizer import load_tokenizer

    quant = None if args.requantize == "none" else QuantConfig(quant_type=args.requantize)
    if args.gguf is not None:  # checked before any work
        if quant is not None:
            raise _fail(
                "merge",
                f"--requantize {args.requantize} writes bitsandbytes safetensors, not GGUF: drop it "
                f"and pick the GGUF tensor type with --gguf ({'|'.join(GGUF_TYPES)})",
            )
        check_output_file(args.output, "the GGUF output")
    else:
        check_output_directory(args.output, "the output directory")
    check_writable(args.output, "the output")  # a read-only or full place is found before the model is loaded
    model, _ = _load_with_adapter("merge", args)
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except ValueError as e:
        print(f"qlora-jax merge: no tokenizer written ({e})", file=sys.stderr)
        tokenizer = None
    if args.gguf is not None:
        from qlora_jax.convert.gguf_export import save_gguf

        source = Path(args.tokenizer or args.model)
        tokenizer_gguf = source if source.suffix == ".gguf" else None
        out = save_gguf(model, args.output, tensor_type=args.gguf, tokenizer=tokenizer, tokenizer_gguf=tokenizer_gguf)
        print(f"wrote {out}")
        return 0
    with _published(args.output) as staging:  # everything appears at once, or nothing
        merge_and_save(
            model,
            staging,
            dtype=jnp.dtype(args.out_dtype),
            quant=quant,
            tokenizer=tokenizer,
            max_shard_size=args.max_shard_size,  # an image-text model keeps its vision tower
            source=args.model if Path(args.model).is_dir() else None,
        )
    print(f"wrote {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """A training run's checkpoint -> a PEFT adapter directory."""
    from qlora_jax.train.run.export import export_run

    try:
        out = export_run(args.run_dir, args.output, step=args.step)
    except ValueError as e:
        raise _fail("export", str(e)) from e
    print(f"wrote {out} (PEFT adapter: PeftModel.from_pretrained(base_model, {str(out)!r}))")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser, *, default_quant: str = "nf4") -> None:
    parser.add_argument("--model", required=True, help="a transformers model directory or a .gguf file")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default=default_quant, help="how to store linear weights")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument(
        "--resize-token-embeddings",
        type=int,
        default=None,
        metavar="N",
        help="resize the embedding (and an untied lm_head) to N rows, for a tokenizer with added "
        "tokens; new rows start at the mean of the old ones, as in transformers",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-jax", description=qlora_jax.__doc__)
    parser.add_argument("--version", action="version", version=f"qlora-jax {qlora_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="list the bitsandbytes 4-bit weights of a safetensors file")
    inspect.add_argument("path", help="a .safetensors file")
    inspect.set_defaults(run=_inspect)

    gen = commands.add_parser("generate", help="generate text from a model (chat template applied)")
    _add_model_arguments(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--tokenizer", default=None, help="where the tokenizer is (default: the model)")
    gen.add_argument("--adapter", default=None, help="a PEFT adapter directory to apply")
    # None: the checkpoint's generation_config.json, else transformers' defaults (64 new tokens, greedy)
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's, else 64")
    gen.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 is greedy, > 0 samples (default: the checkpoint's do_sample and temperature)",
    )
    gen.add_argument("--top-k", type=int, default=None, help="0: off (default: the checkpoint's, else 50)")
    gen.add_argument("--top-p", type=float, default=None, help="1.0: off (default: the checkpoint's)")
    gen.add_argument(
        "--min-p",
        type=float,
        default=None,
        help="keep tokens at least this fraction as likely as the most likely one (default: the checkpoint's)",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="> 1 discourages tokens of the prompt and the output; 1.0: off (default: the checkpoint's)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="complete the raw prompt, without the chat template")
    gen.set_defaults(run=_generate)

    convert = commands.add_parser("convert", help="write a transformers checkpoint (4-bit or dense) of a model")
    _add_model_arguments(convert)
    convert.add_argument("output", help="the directory to write")
    convert.add_argument("--max-shard-size", default="5GB")
    convert.set_defaults(run=_convert)

    train = commands.add_parser("train", help="QLoRA fine-tuning from a YAML config (see docs/config.md)")
    train.add_argument("config", help="the YAML config")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides: --lora.r 32 --train.steps 10")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in train.output_dir (its own files) instead of resuming it",
    )
    train.add_argument(
        "--break-lock",
        action="store_true",
        help="take over a lock held from another host whose training is known to be gone",
    )
    train.set_defaults(run=_train)

    export = commands.add_parser("export", help="write a training run's adapters in PEFT format")
    export.add_argument("run_dir", help="a train.output_dir (with config.json and checkpoints/)")
    export.add_argument("output", help="the adapter directory to write")
    export.add_argument("--step", type=int, default=None, help="which checkpoint (default: the latest)")
    export.set_defaults(run=_export)

    plan = commands.add_parser("plan", help="memory per component of a training config's step, before loading")
    plan.add_argument("config", help="the YAML config")
    plan.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides: --data.max_length 2048")
    plan.add_argument("--compare", action="store_true", help="also compile the full-depth step and show XLA's total")
    plan.add_argument(
        "--longest-row",
        action="store_true",
        help="also search the longest one-row step that fits train.memory_budget (remat full; and "
        "full_offload on a GPU)",
    )
    plan.add_argument(
        "--target",
        default=None,
        metavar="|".join(sorted(TARGETS)),
        help="plan for this GPU: XLA:GPU's compile for it, on this machine without one (needs jax's "
        "CUDA plugin, no GPU); the default plans for this machine's backend",
    )
    plan.set_defaults(run=_plan)

    tune = commands.add_parser("tune", help="measure the fused kernels against XLA for a config's shapes (GPU)")
    tune.add_argument("config", help="the YAML config (its model and train batch; no weights are read)")
    tune.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides: --train.batch_size 4")
    tune.add_argument(
        "--decode-m",
        type=_int_list,
        default=[1, 2, 4, 8, 16],
        metavar="M,...",
        help="generation batch sizes to tune (<= 16; default 1,2,4,8,16)",
    )
    tune.add_argument("--no-train", action="store_true", help="skip the training micro-batch's M")
    tune.add_argument(
        "--cache",
        default=None,
        help="the cache file (default: $QLORA_JAX_AUTOTUNE_CACHE or ~/.cache/qlora_jax/autotune.json)",
    )
    tune.add_argument("--force", action="store_true", help="measure again the keys already cached")
    tune.set_defaults(run=_tune)

    merge = commands.add_parser("merge", help="fold a PEFT adapter into the base model and write a checkpoint")
    _add_model_arguments(merge, default_quant="nf4")
    merge.add_argument("--adapter", required=True, help="a PEFT adapter directory")
    merge.add_argument("output", help="the directory to write (with --gguf: the .gguf file)")
    merge.add_argument("--out-dtype", default="bfloat16", choices=DTYPES)
    merge.add_argument(
        "--requantize",
        default="none",
        choices=("none", *BNB_QUANT_TYPES),
        help="re-quantize the merged weights to bitsandbytes 4-bit",
    )
    merge.add_argument(
        "--gguf",
        default=None,
        metavar="TYPE",
        choices=GGUF_TYPES,
        help=f"write one GGUF file ({'|'.join(GGUF_TYPES)}) for llama.cpp, not safetensors",
    )
    merge.add_argument("--tokenizer", default=None)
    merge.add_argument("--max-shard-size", default="5GB")
    merge.set_defaults(run=_merge)
    return parser


def drop_closed_loop_reports() -> None:
    """Drops Python's reports of "Event loop is closed" raised in callbacks nobody can catch (sys.unraisablehook).

    After orbax fails to write a checkpoint (a full disk), tensorstore finishes the writes still in flight and
    calls back into orbax's asyncio loop, which the failure already closed; Python prints each such callback's
    RuntimeError with a traceback, at a time of tensorstore's choosing. The command has already said what failed in
    one line. The command line installs this for its own process; a library never touches the hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):  # main() may run many times in one process
        return

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_reports = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. What the user can fix (`qlora_jax.errors.QloraJaxError`: bad files, fields, lines; a
    locked, unresumable, diverged or stopped run) and what the system refuses (OSError: a missing file, no
    permission, a full disk) end the command with one message, never a traceback: status 1, or 128 + the signal's
    number for a run stopped by a signal (143: SIGTERM, 130: SIGINT / Ctrl-C)."""
    from qlora_jax.errors import QloraJaxError

    args = build_parser().parse_args(argv)
    drop_closed_loop_reports()
    try:
        try:
            return args.run(args)
        except QloraJaxError as e:
            failure = _fail(args.command, str(e), status=getattr(e, "exit_code", 1))
            failure.agreed = hasattr(e, "exit_code")  # a stop on a signal: every process of a job stops together
            raise failure from e
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise _fail(args.command, f"{where}{e.strerror or e}") from e
        except KeyboardInterrupt:
            message = (
                "interrupted (Ctrl-C twice): the steps since the last checkpoint are lost; run the same command "
                "again to resume from it"
                if args.command == "train"
                else "interrupted (Ctrl-C); outputs are as they were before"
            )
            raise _fail(args.command, message, status=130) from None
        except Exception as e:  # a multi-process run's runtime errors (collectives, the coordination service)
            failure = _distributed_failure(args.command, e)
            if failure is None:
                raise
            raise failure from e
    except CommandFailed as failure:
        if failure.status != 1:
            print(failure.message, file=sys.stderr, flush=True)
        if _multi_process() and not failure.agreed and not _all_failed():
            # Only this process failed: the others may be gone, or stuck in a collective, and JAX's exit handler
            # would wait for them, then print its own errors. One line, then out (the lock was released already).
            if failure.status == 1:
                print(failure.message, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(failure.status)
        raise  # every process stops together (a stop on a signal, or the same error everywhere): a normal exit


FAILED_TOGETHER_S = 30  # how long a failed process of several waits for the others to fail too


def _all_failed() -> bool:
    """Whether every process of the job fails (most errors are the same everywhere: bad data, a refused start,
    divergence); then they exit normally, together, and the job's coordination service ends cleanly."""
    from qlora_jax.parallel.distributed import together

    return together("qlora_jax/failed", FAILED_TOGETHER_S)


def _multi_process() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def _distributed_failure(command: str, error: Exception) -> CommandFailed | None:
    if not _multi_process():
        return None
    from qlora_jax.parallel.distributed import describe_failure

    message = describe_failure(error)
    return None if message is None else _fail(command, message)


if __name__ == "__main__":
    sys.exit(main())
