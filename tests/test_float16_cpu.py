"""`model.dtype: float16` on CPU: jax.nn.dot_product_attention asks for a float16 x float16 -> float32 dot algorithm
that XLA:CPU refuses under jit, so attention is written out there (the same maths, float32 accumulation); the model
computes, trains and matches transformers within float16's precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.quant import QuantConfig
from qlora_jax.train.optim import OptimConfig, make_optimizer
from qlora_jax.train.step import TrainState, make_train_step
from tests.models_util import make_tiny_model, torch, transformers

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the float16 limit is XLA:CPU's")
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 9))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped attention, written out anyway
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "nf4"])
def test_float16_model_matches_float32(family, quant, tmp_path):
    """Dense: against transformers in float32. 4-bit: against our float32 model of the same checkpoint (the
    quantization error is not float16's)."""
    make_tiny_model(family, tmp_path)
    if quant:
        reference, _ = load_pretrained(tmp_path, quantization=QuantConfig(), dtype=jnp.float32)
        theirs = np.asarray(reference(jnp.asarray(TOKENS)))
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(torch.tensor(TOKENS)).logits.numpy()
    # (4-bit: the same codes as the reference, from float32 weights; float16 computes)
    model, _ = load_pretrained(
        tmp_path,
        quantization=QuantConfig() if quant else None,
        dtype=jnp.float16,
        param_dtype=jnp.float32 if quant else None,
    )
    assert model.dtype == jnp.float16
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-2 * np.abs(theirs).max())  # float16's precision


def test_a_float16_qlora_step_trains(tmp_path):
    make_tiny_model("llama", tmp_path)
    model, _ = load_pretrained(tmp_path, quantization=QuantConfig(), dtype=jnp.float16)
    apply_lora(model, LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(0))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    state, step = TrainState.create(lora, optimizer), make_train_step(graphdef, optimizer, chunk_size=8)
    tokens = jnp.asarray(TOKENS[None], jnp.int32)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, axis=-1),
        "segment_ids": jnp.ones_like(tokens),
        "positions": jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), tokens.shape),
    }
    losses = []
    for _ in range(4):
        state, metrics = step(state, base, batch, jax.random.key(0))
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
