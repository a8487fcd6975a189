"""One line, never a traceback, and outputs as they were: a full disk under each writing command (a real one: a
tiny tmpfs in a user namespace), an output that cannot be written (found before the model is loaded), chat
templates that fail or never end (generate and train), empty prompts and NaN temperatures, prompts past the model's
positions, a FIFO or a pipe as data, a batch larger than the data, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qlora_jax.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
NEVER_ENDS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _tokenizer(directory: Path, template: str = "{% for m in messages %}{{ m['content'] }} {% endfor %}") -> Path:
    """A word-level tokenizer of the tiny models' vocabulary (96 ids), with `template` as its chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hi", "there", "what", "is", "2+2?", "4", *[f"w{i}" for i in range(87)]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama (transformers checkpoint), its tokenizer, a PEFT adapter for it, and a run directory with one
    checkpoint of that adapter (what `export` reads)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.convert.peft import save_peft_adapter
    from qlora_jax.lora import LoraConfig, apply_lora
    from qlora_jax.train.build import abstract_model
    from qlora_jax.train.config import config_from_dict
    from qlora_jax.train.optim import make_optimizer
    from qlora_jax.train.run.checkpoint import RunCheckpoints
    from qlora_jax.train.step import TrainState
    from tests.models_util import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", root / "model")
    _tokenizer(root / "model")
    model, _ = load_pretrained(root / "model", quantization=None, dtype=jnp.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian")
    apply_lora(model, lora, rngs=nnx.Rngs(0))
    save_peft_adapter(model, root / "adapter", lora)
    raw = {
        "model": {"path": str(root / "model"), "quant": "none", "dtype": "float32"},
        "data": {"train": str(root / "data.jsonl")},
        "lora": {"r": 8, "lora_alpha": 16},
    }
    config = config_from_dict(raw)
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    _, adapters, _ = nnx.split(abstract_model(config), nnx.LoRAParam, ...)
    adapters = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype), adapters)
    checkpoints = RunCheckpoints(root / "run" / "checkpoints")
    checkpoints.save(TrainState.create(adapters, make_optimizer(config.optim, 10)), {})
    checkpoints.close()
    return {"model": root / "model", "adapter": root / "adapter", "run": root / "run", "root": root}


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /tmp"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def _on_small_disk(disk: Path, size: str, script: str) -> subprocess.CompletedProcess:
    """Runs the shell `script` with a tmpfs of `size` mounted at `disk` (a user and mount namespace: no root
    needed, nothing outside the process sees it)."""
    disk.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o {size} tmpfs {disk} && {script}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "merge --gguf", "convert", "export"])
def test_a_full_disk_is_one_line_and_the_old_output_stays(tiny, tmp_path, command):
    """Each writing command with its output on a disk too small for it (64 KiB), over an existing output: exit
    status 1, one line naming the output and "No space left on device", the old output unchanged, nothing left."""
    if not _unshare_works():
        pytest.skip("no user namespaces here (unshare -r -m): cannot mount a small disk without root")
    disk = tmp_path / "disk"
    python = f"{sys.executable} -m qlora_jax.cli"
    gguf = command == "merge --gguf"
    out = disk / ("model.gguf" if gguf else "out")
    args = {
        "merge": f"merge --model {tiny['model']} --adapter {tiny['adapter']} --quant none {out}",
        "merge --gguf": f"merge --model {tiny['model']} --adapter {tiny['adapter']} --quant none --gguf f32 {out} "
        f"--tokenizer {tmp_path / 'none'}",  # no tokenizer: ours (word-level) has no GGUF form
        "convert": f"convert --model {tiny['model']} --quant none {out}",
        "export": f"export {tiny['run']} {out}",
    }[command]
    old = "echo old > " + (str(out) if gguf else f"{out}/config.json")
    done = _on_small_disk(
        disk,
        "size=64k",
        f"mkdir -p {out.parent} {'' if gguf else out} && {old} && "
        f"{python} {args}; echo rc=$?; find {disk} | sort; "
        f"cat {out if gguf else out / 'config.json'}",
    )
    lines = done.stdout.strip().splitlines()
    assert "rc=1" in lines, (done.stdout, done.stderr[-3000:])
    stderr = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert stderr[-1].startswith(f"qlora-jax {command.split()[0]}: {out}: cannot write "), done.stderr[-3000:]
    assert "No space left on device" in stderr[-1] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1] == "old"  # the old output, as it was
    listing = lines[lines.index("rc=1") + 1 : -1]
    expected = [str(disk), str(out)] if gguf else [str(disk), str(out), str(out / "config.json")]
    assert listing == expected, listing  # no temporary left behind


_SAVE_ON_A_FULL_DISK = """
import sys
import jax.numpy as jnp, numpy as np, optax
from qlora_jax.cli import drop_closed_loop_reports
from qlora_jax.errors import QloraJaxError
from qlora_jax.train.run.checkpoint import RunCheckpoints
drop_closed_loop_reports()  # as the command line does: tensorstore's late callbacks into orbax's closed loop
from qlora_jax.train.step import TrainState
lora = {"a": jnp.asarray(np.random.default_rng(0).normal(size=(256, 1024)), jnp.float32)}  # 3 MiB with AdamW's
checkpoints = RunCheckpoints(sys.argv[1])
try:
    checkpoints.save(TrainState(jnp.int32(7), lora, optax.adam(1e-3).init(lora)), {})
except QloraJaxError as e:
    print(type(e).__name__ + ": " + str(e))
checkpoints.close()
RunCheckpoints(sys.argv[1]).close()  # the next start removes the unfinished save
"""


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_is_one_line_and_cleaned_up_next_time(tmp_path):
    """orbax writing a checkpoint onto a full disk: one OutputError line naming the step (orbax's threads' own
    error logs silenced), and the next start removes the unfinished save."""
    if not _unshare_works():
        pytest.skip("no user namespaces here (unshare -r -m)")
    disk = tmp_path / "disk"
    script = tmp_path / "save.py"
    script.write_text(_SAVE_ON_A_FULL_DISK)
    done = _on_small_disk(disk, "size=256k", f"{sys.executable} {script} {disk}/checkpoints; ls -A {disk}/checkpoints")
    assert done.returncode == 0, done.stderr[-3000:]
    error, said, *listing = done.stdout.strip().splitlines()
    assert error == (
        f"OutputError: {disk}/checkpoints/7: cannot write the checkpoint of step 7 (No space left on "
        "device); what was there before is unchanged"
    ), done.stdout
    assert "removed what an interrupted run left: the unfinished save of step 7" in said
    assert listing == [".qlora_jax"] and "ERROR" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_output_that_cannot_be_written_is_found_before_the_model_is_loaded(tmp_path):
    """merge / convert into a read-only file system: refused at once, naming the output (the model path here does
    not even exist: it is never read)."""
    if not _unshare_works():
        pytest.skip("no user namespaces here (unshare -r -m)")
    disk = tmp_path / "ro"
    python = f"{sys.executable} -m qlora_jax.cli"
    nowhere = tmp_path / "no-model"
    for command in (
        f"merge --model {nowhere} --adapter {nowhere} {disk}/merged",
        f"merge --model {nowhere} --adapter {nowhere} --gguf f16 {disk}/m.gguf",
        f"convert --model {nowhere} {disk}/converted",
    ):
        done = _on_small_disk(disk, "ro,size=16k", f"{python} {command}")
        assert done.returncode == 1, done.stderr[-2000:]
        assert f"cannot be written ({disk}: Read-only file system)" in done.stderr, done.stderr[-2000:]
        assert "no-model" not in done.stderr and "Traceback" not in done.stderr


# ---- chat templates that fail or never end ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (NEVER_ENDS, r"ChatTemplateTimeout: the chat template did not finish rendering within 1 s"),
        (
            "{{ messages.__class__.__mro__ }}",
            r"SecurityError: access to attribute '__class__' of 'list' object is "
            r"unsafe",
        ),
        ("{{ 'x' * 2 ** 60 }}", r"(MemoryError|OverflowError)"),
    ],
)
def test_generate_with_a_bad_chat_template_is_one_line(tiny, tmp_path, monkeypatch, capsys, template, expected):
    monkeypatch.setattr("qlora_jax.tokenizer.CHAT_TEMPLATE_SECONDS", 1.0)
    tokenizer = _tokenizer(tmp_path / "tokenizer", template)
    started = time.time()
    with pytest.raises(SystemExit, match=rf"qlora-jax generate: the chat template fails on this prompt \({expected}"):
        cli_main(
            [
                "generate",
                "--model",
                str(tiny["model"]),
                "--tokenizer",
                str(tokenizer),
                "--quant",
                "none",
                "--prompt",
                "hi",
            ]
        )
    assert time.time() - started < 60


def test_training_data_with_a_chat_template_that_never_ends_names_the_line(tmp_path, monkeypatch):
    from qlora_jax.tokenizer import load_tokenizer
    from qlora_jax.train.data import DataError, load_examples

    monkeypatch.setattr("qlora_jax.tokenizer.CHAT_TEMPLATE_SECONDS", 1.0)
    tokenizer = load_tokenizer(_tokenizer(tmp_path / "tokenizer", NEVER_ENDS))
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}) + "\n"
    )
    started = time.time()
    with pytest.raises(
        DataError,
        match=rf"{data}:1: the chat template fails on this conversation \(ChatTemplate"
        r"Timeout: the chat template did not finish rendering within 1 s",
    ):
        load_examples(data, tokenizer, max_length=32)
    assert time.time() - started < 30


# ---- generate: its arguments ---------------------------------------------------------------------------------------


def test_generate_refuses_empty_prompts_bad_sampling_and_prompts_past_the_positions(tiny, tmp_path):
    model = ["--model", str(tiny["model"]), "--quant", "none"]
    for extra, expected in (
        (["--prompt", ""], "--prompt: prompt 1 is empty"),
        (["--prompt", "hi", "--prompt", "  "], "--prompt: prompt 2 is empty"),
        (["--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite"),
        (["--prompt", "hi", "--top-p", "nan"], "--top-p must be a finite number, got nan"),
    ):
        with pytest.raises(SystemExit, match=rf"^qlora-jax generate: {expected}"):
            cli_main(["generate", "--model", str(tmp_path / "not-loaded"), *extra])
    with pytest.raises(
        SystemExit,
        match=r"qlora-jax generate: max_new_tokens: a prompt of 1 tokens and 200 new "
        r"tokens go past the model's 128 positions",
    ):
        cli_main(["generate", *model, "--prompt", "hi", "--no-chat", "--max-new-tokens", "200"])
    assert cli_main(["generate", *model, "--prompt", "hi", "--no-chat", "--max-new-tokens", "2"]) == 0


# ---- training data: FIFOs, pipes, too little of it -------------------------------------------------------------


def _train_config(tmp_path: Path, data: Path, model: Path | None = None, **train) -> Path:
    config = tmp_path / "c.yaml"
    raw = {
        "model": {"path": str(model or tmp_path / "no-model"), "quant": "none", "dtype": "float32"},
        "data": {"train": str(data), "max_length": 16},
        "train": {"output_dir": str(tmp_path / "run"), "remat": "none"} | train,
    }
    config.write_text(yaml.safe_dump(raw))
    return config


def test_a_fifo_or_a_pipe_as_data_is_refused_not_hung(tmp_path):
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)
    with pytest.raises(
        SystemExit,
        match=rf"qlora-jax train: {fifo}: data.train is a named pipe \(FIFO\) or a pipe, "
        r"not a regular file",
    ):
        cli_main(["train", str(_train_config(tmp_path, fifo))])
    read, write = os.pipe()
    try:
        os.write(write, b'{"text": "hi"}\n')
        pipe = Path(f"/proc/self/fd/{read}")  # what `--data.train <(cat data.jsonl)` gives
        with pytest.raises(SystemExit, match=r"data.train is a named pipe \(FIFO\) or a pipe"):
            cli_main(["train", str(_train_config(tmp_path, pipe))])
    finally:
        os.close(read)
        os.close(write)
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_says_so(tiny, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi there"}\n{"text": "what is 2+2? 4"}\n')
    config = _train_config(tmp_path, data, tiny["model"], batch_size=8)
    with pytest.raises(
        SystemExit,
        match=rf"qlora-jax train: train.batch_size: 8 rows a step, but {data} gives only "
        r"1 rows \(packed into rows of data.max_length=16 tokens\)",
    ):
        cli_main(["train", str(config)])
    with pytest.raises(SystemExit, match=r"gives only 2 rows \(one example a row, in rows of data.max_length=16"):
        cli_main(["train", str(config), "--data.packing", "false"])


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_and_leaves_the_output_as_it_was(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C while `convert` writes (KeyboardInterrupt raised after the weights are in the staging directory, as a
    real SIGINT would be there): status 130, one line, the existing output as it was, nothing left behind. (`train`
    with real signals: tests/test_train.py.)"""
    from qlora_jax.convert import hf

    real = hf.save_pretrained

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "save_pretrained", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(SystemExit) as stopped:
        cli_main(["convert", "--model", str(tiny["model"]), "--quant", "none", str(out)])
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "qlora-jax convert: interrupted (Ctrl-C); outputs are as they were before\n"
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["config.json"]
    assert (out / "config.json").read_text() == "old"
