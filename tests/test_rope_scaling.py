"""Every rope_type transformers implements for the supported families (its ROPE_INIT_FUNCTIONS: linear, dynamic,
yarn, longrope, llama3, and default), against transformers' logits at short positions and past the length where
the scaling changes (original_max_position_embeddings for yarn and longrope, max_position_embeddings for
dynamic), and in KV-cache generation across that length."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.generate import SamplingConfig, generate
from qlora_jax.models import ConfigError, ModelConfig, UnsupportedModelError
from qlora_jax.models.config import ROPE_TYPES
from tests.families import family_config
from tests.helpers import assert_close, random_tokens
from tests.models_util import hf_logits, make_tiny_model, torch, transformers

pytestmark = pytest.mark.oracle

F32_TOL = 2e-5
SHORT, LONG = 9, 40  # LONG is past every case's threshold (16), within max_position_embeddings
# longrope's per-frequency factors (rotary_dim / 2 of them), not all equal so that their order matters
_SHORT_FACTORS = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5]
_LONG_FACTORS = [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0]

CASES = {
    "llama-linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-dynamic": ("llama", dict(max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "llama-yarn": ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "llama-yarn-mscale": (
        "llama",
        dict(
            rope_scaling=dict(
                rope_type="yarn",
                factor=8.0,
                original_max_position_embeddings=16,
                mscale=0.8,
                mscale_all_dim=0.5,
                beta_fast=16.0,
                beta_slow=2.0,
                truncate=False,
            )
        ),
    ),
    "llama-yarn-attention-factor": (
        "llama",
        dict(
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.3)
        ),
    ),
    "llama-longrope": (
        "llama",
        dict(
            rope_scaling=dict(
                rope_type="longrope",
                short_factor=_SHORT_FACTORS,
                long_factor=_LONG_FACTORS,
                original_max_position_embeddings=16,
                factor=4.0,
            )
        ),
    ),
    "llama3": ("llama3.2", {}),
    "mistral-yarn": (
        "mistral",
        dict(rope_scaling=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16)),
    ),
    # Qwen2.5's long-context config.json ("type": "yarn", the legacy key)
    "qwen2-yarn": ("qwen2", dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "qwen3-yarn": (
        "qwen3",
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    ),
    "qwen3-dynamic": ("qwen3", dict(max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=4.0))),
    # Phi-3-128k: longrope with Phi3Config's own original_max_position_embeddings, the factor implied by the ratio
    # of the two lengths, partial rotary embeddings (8 rotary dimensions of 16: 4 factors)
    "phi3-longrope": (
        "phi3",
        dict(
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            partial_rotary_factor=0.5,
            rope_scaling=dict(rope_type="longrope", short_factor=_SHORT_FACTORS[:4], long_factor=_LONG_FACTORS[:4]),
        ),
    ),
    "gemma2-dynamic": ("gemma2", dict(max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "gemma3-yarn": (
        "gemma3",
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    return make_tiny_model(family, directory, **overrides), directory


def test_every_rope_type_is_covered():
    covered = {CASES[case][1].get("rope_scaling", {}).get("rope_type") for case in CASES} | {"llama3", "default"}
    covered = {t for t in covered if t} | {"yarn"}  # qwen2's legacy "type"
    assert set(ROPE_TYPES) == covered
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # proportional is Gemma 4's (partial rotary as zero frequencies), a family this package does not load
    assert set(ROPE_INIT_FUNCTIONS) - set(ROPE_TYPES) == {"proportional"}


@pytest.mark.parametrize("length", [SHORT, LONG])
def test_logits_match_transformers(tiny, length):
    """A fresh transformers model per call: its length-dependent frequencies follow this call's length."""
    hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    tokens = random_tokens(length=length)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert_close(model(jnp.asarray(tokens)), hf_logits(fresh, tokens), F32_TOL)


@pytest.mark.parametrize("case", ["llama-dynamic", "phi3-longrope", "qwen2-yarn"])
def test_generation_across_the_threshold_matches_transformers(case, tmp_path):
    """Greedy decoding with a KV cache from a 12-token prompt to 30 tokens: each decoding step computes its
    frequencies from its own position, as transformers' generate does (dynamic recomputes them, longrope switches
    to its long factors once past original_max_position_embeddings)."""
    family, overrides = CASES[case]
    make_tiny_model(family, tmp_path, **overrides)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = random_tokens(length=12, seed=3)[:1]
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=18, do_sample=False, min_new_tokens=18, pad_token_id=0
        )[0, 12:].tolist()
    model, _ = load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    ours = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=18, stop_token_ids=(-1,)))[0]
    assert ours == theirs


def _config(**fields):
    return ModelConfig.from_hf_config(family_config("llama", **fields), source="config.json")


def test_rope_parameters_are_checked_naming_the_field():
    with pytest.raises(UnsupportedModelError, match=r"rope_scaling\.rope_type 'proportional'"):
        _config(rope_scaling=dict(rope_type="proportional", factor=2.0))
    with pytest.raises(ConfigError, match=r"rope_scaling\.short_factor must list 8 positive numbers"):
        _config(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 7, long_factor=[1.0] * 8))
    with pytest.raises(ConfigError, match=r"rope_parameters\.factor is required for rope_type 'dynamic'"):
        _config(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0))
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor must be a positive number"):
        _config(rope_scaling=dict(rope_type="linear", factor="4"))


def test_rope_defaults_follow_transformers():
    yarn = _config(rope_scaling=dict(rope_type="yarn", factor=4.0)).rope
    assert yarn.original_max_position_embeddings == 128  # max_position_embeddings when not given
    assert yarn.attention_scaling == pytest.approx(0.1 * np.log(4.0) + 1)
    implied = _config(
        max_position_embeddings=64, rope_scaling=dict(rope_type="yarn", original_max_position_embeddings=16)
    )
    assert implied.rope.factor == 4.0
    phi3 = ModelConfig.from_hf_config(
        family_config(
            "phi3",
            rope_scaling=dict(
                rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=32
            ),
        )
    )
    assert phi3.rope.original_max_position_embeddings == 4096  # Phi3Config's own field (default) wins
