"""A checkpoint's generation defaults (generation_config.json, a GGUF's end ids): read as transformers'
GenerationConfig reads them, used by `generate` as transformers' `generate` uses them (several end ids: a
token-identical stop), carried by every export (merge, save_pretrained, GGUF)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.hf import load_pretrained, save_pretrained
from qlora_jax.convert.merge import merge_and_save
from qlora_jax.generate import SamplingConfig, generate
from qlora_jax.models.config import ConfigError
from qlora_jax.models.generation_config import (
    GENERATION_CONFIG,
    GenerationDefaults,
    UnsupportedGenerationError,
    generation_config_from_dict,
    read_generation_config,
)
from tests.models_util import make_tiny_model, torch, transformers

PROMPTS = [[5, 17, 33, 2, 9, 41], [7, 3, 60]]  # the second is left-padded

FIELDS = (
    "bos_token_id",
    "pad_token_id",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
    "max_length",
)


def _hf_eos(config) -> tuple[int, ...]:
    eos = config.eos_token_id
    return () if eos is None else tuple(eos if isinstance(eos, list) else [eos])


@pytest.mark.oracle
@pytest.mark.parametrize(
    "fields",
    [
        dict(
            bos_token_id=1,
            eos_token_id=[2, 7, 9],
            pad_token_id=0,
            do_sample=True,
            temperature=0.6,
            top_k=20,
            top_p=0.95,
            min_p=0.05,
            repetition_penalty=1.05,
            max_new_tokens=30,
        ),  # Qwen-style
        dict(bos_token_id=1, eos_token_id=2, do_sample=False, max_length=40),
        dict(eos_token_id=[3, 4], cache_implementation="hybrid"),  # a field that changes nothing generated
    ],
)
def test_read_as_transformers_reads_it(tmp_path, fields):
    transformers.GenerationConfig(**fields).save_pretrained(tmp_path)
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    ours = read_generation_config(tmp_path)
    assert ours.eos_token_id == _hf_eos(theirs)
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.unsupported == ()
    # written back, transformers reads the same config
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / GENERATION_CONFIG).write_text(ours.to_json())
    again = transformers.GenerationConfig.from_pretrained(tmp_path / "again")
    assert again.to_diff_dict() == theirs.to_diff_dict()
    built = GenerationDefaults(**{n: getattr(ours, n) for n in FIELDS}, eos_token_id=ours.eos_token_id)
    assert generation_config_from_dict(built.to_dict()) == dataclass_without_source(ours)


def dataclass_without_source(defaults: GenerationDefaults) -> GenerationDefaults:
    import dataclasses

    return dataclasses.replace(defaults, source=GENERATION_CONFIG)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id"),
        ({"temperature": -1}, "temperature must be a number >= 0"),
        ({"do_sample": True, "temperature": 0}, "temperature must be a number > 0"),
        ({"top_p": 1.5}, "top_p must be a number > 0.0 and <= 1.0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
    ],
)
def test_malformed_fields_are_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        generation_config_from_dict(raw, source="g.json")


def test_unsupported_fields_are_refused_before_generating(tmp_path):
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps({"num_beams": 4, "eos_token_id": 2, "num_beams_x": 1}))
    defaults = read_generation_config(tmp_path)
    assert defaults.unsupported == (("num_beams", 4),)
    with pytest.raises(UnsupportedGenerationError, match=r"generation_config.json: num_beams=4 \(beam search\) is not"):
        SamplingConfig().resolved(defaults)
    # the command line refuses it before reading any weight (the directory holds none)
    from qlora_jax.cli import main

    with pytest.raises(SystemExit, match="num_beams=4 .* remove the field or set it to 1"):
        main(["generate", "--model", str(tmp_path), "--prompt", "hi"])


def test_resolution_follows_transformers_defaults():
    qwen = generation_config_from_dict(
        {
            "eos_token_id": [7, 3],
            "do_sample": True,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
            "repetition_penalty": 1.05,
        }
    )
    got = SamplingConfig().resolved(qwen, eos_token_ids=(2,))
    assert (got.temperature, got.top_k, got.top_p, got.repetition_penalty, got.stop_token_ids) == (
        0.7,
        20,
        0.8,
        1.05,
        (7, 3),
    )
    # explicit arguments override; 0 / 1.0 turn a filter off; greedy drops the sampling filters
    assert SamplingConfig(temperature=0).resolved(qwen).greedy
    assert SamplingConfig(temperature=0).resolved(qwen).repetition_penalty == 1.05  # greedy is penalized too
    off = SamplingConfig(top_k=0, top_p=1.0, repetition_penalty=1.0, stop_token_ids=()).resolved(qwen)
    assert (off.top_k, off.top_p, off.repetition_penalty, off.stop_token_ids) == (None, None, None, ())
    # nothing said: greedy, config.json's eos, 64 tokens; sampling asked for: transformers' top_k of 50
    plain = SamplingConfig().resolved(None, eos_token_ids=(2,))
    assert (plain.greedy, plain.stop_token_ids, plain.max_new_tokens) == (True, (2,), 64)
    assert SamplingConfig(temperature=1.0).resolved(None).top_k == 50
    # max_length counts the prompt
    assert (
        SamplingConfig().resolved(generation_config_from_dict({"max_length": 20}), prompt_length=6).max_new_tokens == 14
    )
    with pytest.raises(ValueError, match="max_length=5 leaves no room after a prompt of 6 tokens"):
        SamplingConfig().resolved(generation_config_from_dict({"max_length": 5}), prompt_length=6)


def _end_ids(free: list[list[int]]) -> tuple[int, int]:
    """Two ids that end the two rows early, at different steps, each row at its own id."""
    for i, a in enumerate(free[0][1:6], 1):
        for j, b in enumerate(free[1][1:8], 1):
            if a != b and j != i and a not in free[0][:i] + free[1][: j + 1] and b not in free[1][:j] + free[0][:i]:
                return a, b
    pytest.skip("no pair of distinct end tokens in this random model's output")


@pytest.mark.oracle
def test_two_end_ids_stop_as_transformers_generate_stops(tmp_path):
    """A Llama-3-style checkpoint: config.json names one eos, generation_config.json two end ids (as
    <|end_of_text|> and <|eot_id|>); greedy decoding stops where transformers' generate stops, token for token."""
    make_tiny_model("llama", tmp_path, bos_token_id=1, eos_token_id=95)
    model, _ = load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, stop_token_ids=()))
    a, b = _end_ids(free)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[95, a, b], do_sample=False).save_pretrained(tmp_path)
    model, config = load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    assert config.generation.eos_token_id == (95, a, b) and config.eos_token_ids == (95,)
    ours = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10))
    assert [len(row) for row in ours] == [free[0].index(a), free[1].index(b)]  # each row at its own end id

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)[:, longest:].tolist()
    ends = {95, a, b}
    for row, their_row in zip(ours, theirs, strict=True):
        stop = next(i for i, t in enumerate(their_row) if t in ends)  # transformers keeps the end id, then pads
        assert row == their_row[:stop]


@pytest.mark.oracle
def test_exports_carry_the_generation_config(tmp_path):
    source = tmp_path / "source"
    make_tiny_model("llama", source, eos_token_id=2)
    shipped = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 7], do_sample=True, temperature=0.6, top_p=0.9, min_p=0.1
    )
    shipped.save_pretrained(source)
    model, _ = load_pretrained(source, quantization=None, dtype=jnp.float32)
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32)
    save_pretrained(model, tmp_path / "saved")
    for out in ("merged", "saved"):
        theirs = transformers.GenerationConfig.from_pretrained(tmp_path / out)
        assert theirs.to_diff_dict() == shipped.to_diff_dict(), out
    # transformers loads the merged model with it
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert hf.generation_config.eos_token_id == [2, 7] and hf.generation_config.min_p == 0.1


@pytest.mark.oracle
def test_gguf_export_writes_llamacpp_end_keys_and_reads_them_back(tmp_path):
    gguf = pytest.importorskip("gguf")
    from qlora_jax.convert.gguf_export import save_gguf

    source = tmp_path / "source"
    make_tiny_model("llama", source, bos_token_id=1, eos_token_id=2)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 7, 9]).save_pretrained(source)
    model, _ = load_pretrained(source, quantization=None, dtype=jnp.float32)
    path = save_gguf(model, tmp_path / "m.gguf", tensor_type="f32")
    fields = gguf.GGUFReader(path).fields
    keys = {k: fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("eos", "eot", "eom")}
    assert keys == {"eos": 2, "eot": 7, "eom": 9}
    assert read_generation_config(path).eos_token_id == (2, 7, 9)
    again, config = load_pretrained(path, quantization=None, dtype=jnp.float32)
    assert config.generation.eos_token_id == (2, 7, 9)
    free = generate(again, PROMPTS, SamplingConfig(max_new_tokens=6, stop_token_ids=()))
    stopped = generate(again, PROMPTS, SamplingConfig(max_new_tokens=6))
    for full, cut in zip(free, stopped, strict=True):
        ends = [i for i, t in enumerate(full) if t in (2, 7, 9)]
        assert cut == full[: ends[0]] if ends else cut == full


@pytest.mark.oracle
def test_greedy_with_a_repetition_penalty_matches_transformers(tmp_path):
    """Qwen's generation_config.json sets repetition_penalty: greedy decoding applies it to the prompt's tokens
    (not its left padding) and to each generated one, as transformers' generate does."""
    make_tiny_model("qwen3", tmp_path)
    transformers.GenerationConfig(do_sample=False, repetition_penalty=1.5).save_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    ours = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, stop_token_ids=()))
    plain = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, stop_token_ids=(), repetition_penalty=1.0))
    assert ours != plain  # the penalty changes this random model's greedy output
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    assert ours == theirs[:, longest:].tolist()
    assert np.all(np.asarray(ours) < 96)
