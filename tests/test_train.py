"""`train()` end to end on a tiny model with SmolLM2's tokenizer: outputs, PEFT export, kill-and-resume with
bit-identical losses, divergence handling, bad data lines, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from qlora_jax.cli import main as cli_main
from qlora_jax.train import setup as train_setup
from qlora_jax.train.config import load_config
from qlora_jax.train.loop import TrainingDiverged, train
from tests.tiny_smol import save_tiny_smol

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_gguf):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer (fast enough to train in a test)."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    return save_tiny_smol(tmp_path_factory.mktemp("tiny_smol"), smollm2_gguf)


def _config(tmp_path, model_dir, **train_fields):
    data = ROOT / "examples" / "data"
    raw = {
        "model": {"path": str(model_dir), "quant": "nf4", "dtype": "float32"},
        "data": {
            "train": str(data / "dates_train.jsonl"),
            "eval": str(data / "dates_eval.jsonl"),
            "max_length": 64,
        },  # fmt: skip
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "steps": 6,
            "batch_size": 4,
            "grad_accum": 2,
            "eval_batches": 2,
            "log_every": 1,
        }
        | train_fields,  # fmt: skip
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def test_train_end_to_end_writes_everything_and_the_adapter_loads_in_peft(tmp_path, tiny_model_dir):
    config = load_config(_config(tmp_path, tiny_model_dir, samples=["March 5, 2021"], eval_exact_match=4))
    result = train(config, progress=False)
    run = result.output_dir
    assert result.steps == 6 and len(result.train_losses) == 6
    assert result.train_losses[-1] < result.train_losses[0]
    for name in ("metrics.jsonl", "loss.png", "samples.json", "config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "6").is_dir()
    samples = json.loads((run / "samples.json").read_text())
    assert len(samples["before"]) == len(samples["after"]) == 1 and len(samples["eval_after"]) == 4
    assert result.exact_match_before is not None and result.exact_match_after is not None

    peft = pytest.importorskip("peft")
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, run / "adapter").eval()
    # PEFT on the dense base vs ours on the same dequantized base: load ours densely from the NF4 model
    from qlora_jax.convert.merge import merge_and_save

    merge_and_save(result.model, tmp_path / "merged", dtype=jnp.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 49152, (1, 10))
    ours = np.asarray(result.model(jnp.asarray(tokens)))
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4 * np.abs(ours).max())
        assert peft_model(torch.tensor(tokens)).logits.shape == ours.shape

    # `qlora-jax export` rebuilds the same adapter from the checkpoint alone
    from safetensors.numpy import load_file

    assert cli_main(["export", str(run), str(tmp_path / "exported")]) == 0
    written, exported = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(
        tmp_path / "exported" / "adapter_model.safetensors")  # fmt: skip
    assert written.keys() == exported.keys()
    for key in written:
        np.testing.assert_array_equal(written[key], exported[key], err_msg=key)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "exported" / "adapter_config.json").read_text())  # fmt: skip
    with pytest.raises(SystemExit, match="no checkpoint of step 3"):
        cli_main(["export", str(run), str(tmp_path / "nope"), "--step", "3"])
    with pytest.raises(SystemExit, match="not a training run directory"):
        cli_main(["export", str(tmp_path), str(tmp_path / "nope")])
    assert not (tmp_path / "nope").exists()


def test_kill_and_resume_gives_bit_identical_losses(tmp_path, tiny_model_dir):
    uninterrupted = load_config(_config(tmp_path / "a", tiny_model_dir, save_every=1, export_peft=False))
    expected = train(uninterrupted, progress=False)

    config_path = _config(tmp_path / "b", tiny_model_dir, save_every=1, export_peft=False)
    run = tmp_path / "b" / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "qlora_jax.cli", "train", "--no-progress", str(config_path)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(_losses(run) if (run / "metrics.jsonl").exists() else {}) < 3:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    finally:
        process.wait()
    killed_at = max(_losses(run))
    assert 3 <= killed_at < 6, killed_at
    resumed = train(load_config(config_path), progress=False)
    assert _losses(run) == _losses(tmp_path / "a" / "run")  # every step, bit for bit
    assert resumed.train_losses == expected.train_losses


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    real = train_setup.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, base, batch, key):
            new_state, metrics = step(state, base, batch, key)
            if int(new_state.step) == 5:
                metrics = dict(metrics, finite=np.bool_(False), loss=np.float32(np.nan))
            return new_state, metrics

        return wrapped

    monkeypatch.setattr(train_setup, "make_train_step", poisoned)
    config = load_config(_config(tmp_path, tiny_model_dir, save_every=2))
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*last good checkpoint is .*checkpoints/4"):
        train(config, progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]


def test_bad_data_line_is_named_by_the_cli(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    good = (ROOT / "examples" / "data" / "dates_train.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([*good, '{"messages": [{"role": "user", "content": "x"}'  # unclosed
                              ]) + "\n")  # fmt: skip
    config = _config(tmp_path, tiny_model_dir)
    with pytest.raises(SystemExit, match=r"bad.jsonl:4"):
        cli_main(["train", str(config), "--data.train", str(bad)])
    with pytest.raises(SystemExit, match=r"lora.r: expected an integer"):
        cli_main(["train", str(config), "--lora.r", "big"])


def test_offload_and_remat_options_train_the_same(tmp_path, tiny_model_dir):
    base = load_config(_config(tmp_path / "a", tiny_model_dir, steps=2, export_peft=False, remat="none"))
    offload = dataclasses.replace(base, optim=dataclasses.replace(base.optim, offload=True),
                                  train=dataclasses.replace(base.train, remat="full",
                                                            output_dir=str(tmp_path / "b")))  # fmt: skip
    a, b = train(base, progress=False), train(offload, progress=False)
    np.testing.assert_allclose(a.train_losses, b.train_losses, rtol=1e-5)
