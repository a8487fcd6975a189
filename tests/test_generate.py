"""Generation: the KV-cache path against full recomputation and against transformers' generate; sampling."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    generate,
    min_p_filter,
    sample_logits,
)
from qlora_jax.models import ComputeOptions
from tests.models_util import make_tiny_model, torch

PROMPTS = [[5, 17, 33, 2, 9, 41], [7, 3, 60]]  # different lengths: the second is left-padded


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma2", "qwen3", "phi3"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_tiny_model(request.param, directory)
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    return hf_model, model


def test_greedy_matches_transformers_generate(tiny):
    hf_model, model = tiny
    config = SamplingConfig(max_new_tokens=8, stop_token_ids=())
    ours = generate(model, PROMPTS, config)
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        theirs = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        )[:, longest:]
    assert ours == theirs.tolist()


def test_cached_decoding_equals_recomputing_from_scratch(tiny):
    _, model = tiny
    prompt = PROMPTS[0]
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=6, stop_token_ids=()))[0]
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(np.argmax(np.asarray(model(jnp.asarray([tokens])))[0, -1])))
    assert ours == tokens[len(prompt) :]


def test_prefill_in_query_blocks_generates_the_same(tiny):
    """The prompt's prefill over the KV cache, with queries 4 at a time (left padding included), decodes the same
    tokens as all queries at once."""
    _, model = tiny
    config = SamplingConfig(max_new_tokens=6, stop_token_ids=())
    whole = generate(model, PROMPTS, config, options=ComputeOptions(attention_block=0))
    assert generate(model, PROMPTS, config, options=ComputeOptions(attention_block=4)) == whole


def test_stop_tokens_end_each_sequence(tiny):
    _, model = tiny
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, stop_token_ids=()))
    stop = free[0][3]
    stopped = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,)))
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert cut == expected


def test_sampling_is_seeded_and_filters():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    import jax

    key = jax.random.key(0)
    hot = SamplingConfig(temperature=1.0, seed=1)
    assert (sample_logits(logits, key, hot) == sample_logits(logits, key, hot)).all()
    greedy = jnp.argmax(logits, -1)
    assert (sample_logits(logits, key, dataclasses.replace(hot, top_k=1)) == greedy).all()
    assert (sample_logits(logits, key, dataclasses.replace(hot, top_p=1e-6)) == greedy).all()
    top3 = jax.lax.top_k(logits, 3)[1]
    for seed in range(20):
        picked = sample_logits(logits, jax.random.key(seed), dataclasses.replace(hot, top_k=3))
        assert all(int(picked[i]) in top3[i].tolist() for i in range(4))
    draws = {tuple(sample_logits(logits, jax.random.key(s), hot).tolist()) for s in range(10)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_empty_prompt_is_rejected(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])


@pytest.mark.oracle
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.7, 1.0])
def test_min_p_keeps_transformers_set(min_p):
    """The tokens MinPLogitsWarper keeps, on random logits (with some already filtered to -inf)."""
    from transformers.generation.logits_process import MinPLogitsWarper

    rng = np.random.default_rng(int(min_p * 100))
    logits = rng.standard_normal((6, 200)).astype(np.float32) * 3
    logits[0, :150] = -np.inf  # what a top-k before it leaves
    theirs = MinPLogitsWarper(min_p)(None, torch.tensor(logits)).numpy()
    ours = np.asarray(min_p_filter(jnp.asarray(logits), min_p))
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.oracle
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(penalty):
    """RepetitionPenaltyLogitsProcessor on random logits, for the tokens of (unpadded) prompts with repeats."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    ids = rng.integers(0, 50, (3, 12))
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits)).numpy()
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), seen, penalty))
    np.testing.assert_array_equal(ours != logits, theirs != logits)  # the same entries penalized
    np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=0)  # XLA may divide via the reciprocal: 1 ulp


def test_min_p_and_penalty_in_sampling():
    import jax

    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    hot = SamplingConfig(temperature=1.0)
    # min_p = 1 keeps the most likely token only: a draw is the argmax
    assert (
        sample_logits(logits, jax.random.key(0), dataclasses.replace(hot, min_p=1.0)) == jnp.argmax(logits, -1)
    ).all()
    # a penalty on the argmax tokens turns greedy elsewhere
    seen = np.zeros((4, 50), bool)
    seen[np.arange(4), np.asarray(jnp.argmax(logits, -1))] = True
    greedy = SamplingConfig(temperature=0.0, repetition_penalty=1e6)
    assert not (sample_logits(logits, jax.random.key(0), greedy, jnp.asarray(seen)) == jnp.argmax(logits, -1)).any()
