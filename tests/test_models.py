"""Every family's logits against transformers': float32 (tight), bfloat16 (documented tolerance), with padding,
packed segments, and NF4 against transformers + bitsandbytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.models import ComputeOptions
from qlora_jax.quant import QuantConfig
from tests.families import GEMMA3_TEXT, GEMMA3_VISION
from tests.helpers import assert_close, random_tokens
from tests.models_util import FAMILIES, hf_logits, make_tiny_model, torch, transformers

pytestmark = pytest.mark.oracle

# Relative to the largest |logit|. bfloat16: both sides round every activation to 8 bits of mantissa, in
# slightly different places (e.g. softmax probabilities, RoPE tables), which compounds over layers.
F32_TOL, BF16_TOL = 2e-5, 3e-2


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, make_tiny_model(request.param, directory), directory


def test_float32_logits_match(tiny):
    family, hf_model, directory = tiny
    model, config = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    assert config.model_type == FAMILIES[family]["model_type"]
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), hf_logits(hf_model, tokens), F32_TOL)


def test_bfloat16_logits_match(tiny):
    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.bfloat16)
    tokens = random_tokens()
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    assert_close(model(jnp.asarray(tokens)), hf_logits(hf_bf16, tokens), BF16_TOL)


def test_left_padding_matches(tiny):
    """Padding keys are never attended to; positions count real tokens only, as transformers' generate does."""
    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    tokens = random_tokens()
    valid = np.ones(tokens.shape, bool)
    valid[0, :3] = False  # the first row is left-padded by 3
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    ours = model.logits(
        model.hidden_states(jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid))[0]
    )
    theirs = hf_logits(hf_model, tokens, attention_mask=valid.astype(np.int64), position_ids=positions)
    assert_close(np.asarray(ours)[valid], theirs[valid], F32_TOL)


def test_blocked_attention_matches(tiny):
    """Queries taken 4 at a time (the last block padded), with left padding: still transformers' logits."""
    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    tokens = random_tokens(length=11)
    valid = np.ones(tokens.shape, bool)
    valid[1, :2] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    options = ComputeOptions(attention_block=4)
    h, _ = model.hidden_states(
        jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid), options=options
    )
    ours = model.logits(h, options=options)
    theirs = hf_logits(hf_model, tokens, attention_mask=valid.astype(np.int64), position_ids=positions)
    assert_close(np.asarray(ours)[valid], theirs[valid], F32_TOL)


def test_packed_segments_equal_separate_sequences(tiny):
    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    a, b = random_tokens(1, 5, seed=1)[0], random_tokens(1, 4, seed=2)[0]
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 5 + [2] * 4])
    positions = np.array([list(range(5)) + list(range(4))])
    ours = np.asarray(model(jnp.asarray(packed), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)))
    assert_close(ours[0, :5], hf_logits(hf_model, a[None])[0], F32_TOL)
    assert_close(ours[0, 5:], hf_logits(hf_model, b[None])[0], F32_TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_nf4_logits_match_transformers_bitsandbytes(family, tmp_path):
    pytest.importorskip("bitsandbytes")
    make_tiny_model(family, tmp_path)
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf_4bit = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    ).eval()
    tokens = random_tokens()
    theirs = hf_logits(hf_4bit, tokens)
    model, _ = load_pretrained(tmp_path, quantization=QuantConfig(), dtype=jnp.float32)
    assert model.model.layers.self_attn.q_proj.is_quantized
    assert model.lm_head is None or not model.lm_head.is_quantized  # kept in 16 bits, as bitsandbytes does
    # Same 4-bit codes; the double-quantization offset may differ from torch's mean in its last bit.
    assert_close(model(jnp.asarray(tokens)), theirs, 1e-4)

    # A checkpoint transformers saved in 4 bits loads as stored (no re-quantization) and gives the same logits.
    hf_4bit.save_pretrained(tmp_path / "saved_4bit")
    prequantized, _ = load_pretrained(tmp_path / "saved_4bit", dtype=jnp.float32)
    assert_close(prequantized(jnp.asarray(tokens)), theirs, 1e-5)


def test_gemma3_image_text_checkpoint_loads_its_text_decoder(tmp_path):
    config = transformers.Gemma3Config(text_config=GEMMA3_TEXT, vision_config=GEMMA3_VISION, mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf_model.save_pretrained(tmp_path)
    model, ours = load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    assert ours.model_type == "gemma3_text" and ours.num_layers == 2
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), hf_logits(hf_model, tokens), F32_TOL)


def test_a_frozen_dense_matmul_backward_is_autodiffs_without_a_float32_weight():
    from qlora_jax.nn import frozen_matmul

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (3, 5, 64), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (96, 64), jnp.float32).astype(jnp.bfloat16)
    c = jax.random.normal(keys[2], (3, 5, 96), jnp.float32)

    def plain(x):
        y = jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jnp.sum(y.astype(jnp.float32) * c)

    def ours(x):
        return jnp.sum(frozen_matmul(x, w).astype(jnp.float32) * c)

    assert ours(x) == plain(x)
    assert jnp.array_equal(jax.grad(ours)(x), jax.grad(plain)(x))  # the same products, summed in float32
    assert jnp.array_equal(jax.grad(ours)(x), jax.jit(jax.grad(ours))(x))

    # autodiff multiplies the float32 cotangent by the bf16 weight, a dot XLA compiles with a float32 copy of the
    # weight (tests/test_gpu_plan.py sees it in XLA:GPU's program); ours multiplies two bf16 operands
    def operand_dtypes(fn):
        eqns = jax.make_jaxpr(jax.grad(fn))(x).jaxpr.eqns
        return {tuple(v.aval.dtype.name for v in e.invars) for e in eqns if e.primitive.name == "dot_general"}

    assert ("float32", "bfloat16") in operand_dtypes(plain)
    assert operand_dtypes(ours) == {("bfloat16", "bfloat16")}
