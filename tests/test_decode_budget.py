"""The per-token budget of decoding, from the program XLA:GPU compiles for an H200 (deviceless; no GPU).

The structural targets of decoding at the memory-bandwidth limit (docs/benchmarks.md has the 8B figures): no
launch copies a slice of a weight (or of the KV cache) out of its stack; a fixed, small number of launches a
layer, 4 of them the decode kernel (q/k/v, o, gate/up, down); bytes moved per token within 1.15x of what a token
must read (4-bit linears as stored, the 16-bit lm_head, the KV cache).
"""

from __future__ import annotations

import pytest

from qlora_jax.models import ModelConfig
from tests.helpers import launches_by_kind

# Llama-shaped, GQA 4:1, small enough to compile in seconds and large enough that the weights, not the
# per-token bookkeeping (sampling, float32 logits), dominate the bytes.
SMALL = dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
)
# What one layer launches at most: 4 decode-kernel calls and the XLA fusions around them (the two norms, rope and
# the cache writes, attention's score and output reductions and its softmax, the residual adds).
MAX_LAUNCHES_PER_LAYER = 13
DECODE_KERNEL_CALLS_PER_LAYER = 4


@pytest.mark.deviceless
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_decoding_a_token_reads_the_weights_once(h200, batch):
    from qlora_jax.decode_budget import decode_budget

    config = ModelConfig.from_hf_config(SMALL, source="test")
    budget = decode_budget(config, batch=batch, cache_length=128, target=h200, per_layer=batch == 1)
    assert budget.slice_copies == ()
    kernels = launches_by_kind(budget.report).get("__gpu$xla.gpu.triton", 0)
    assert kernels == DECODE_KERNEL_CALLS_PER_LAYER * config.num_layers
    if budget.launches_per_layer is not None:
        assert budget.launches_per_layer <= MAX_LAUNCHES_PER_LAYER, budget.report.table()
    assert budget.bytes_ratio <= 1.15, (budget.bytes, budget.roofline_bytes, budget.report.table())
    assert budget.bytes_read >= budget.roofline_bytes * 0.99  # the weights are read, not skipped


@pytest.mark.deviceless
@pytest.mark.slow
def test_the_xla_path_copies_each_layers_weights_before_dequantizing(h200):
    """What "auto" runs untuned (XLA): each 4-bit weight sliced out, dequantized to 16 bits and read again; the
    budget shows it (and that the fused path above does not)."""
    from qlora_jax.decode_budget import decode_budget
    from qlora_jax.kernels import KernelOptions
    from qlora_jax.models import ComputeOptions

    config = ModelConfig.from_hf_config(SMALL, source="test")
    budget = decode_budget(
        config,
        cache_length=128,
        target=h200,
        per_layer=False,
        options=ComputeOptions(kernels=KernelOptions(impl="xla")),
    )
    packed = [name for name, _ in budget.slice_copies if "packed" in name]
    assert len(packed) == 7 * config.num_layers  # every linear of every layer
    assert budget.bytes_ratio > 3


def test_the_roofline_is_every_weight_once_one_embedding_row_a_sequence_and_the_cache():
    """roofline_bytes on an abstract model (nothing compiled: runs anywhere): an untied table is read one row a
    sequence, a tied one whole (it is the lm_head too); the KV cache is read whole."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.decode_budget import roofline_bytes
    from qlora_jax.models import DecoderLM, KVCache
    from qlora_jax.quant import QuantConfig

    batch, length = 3, 128
    for tied in (False, True):
        config = ModelConfig.from_hf_config(SMALL | {"tie_word_embeddings": tied}, source="test")
        model = nnx.eval_shape(
            lambda config=config: DecoderLM(
                config, quant=QuantConfig(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
            )
        )
        cache = jax.eval_shape(lambda config=config: KVCache.empty(config, batch, length, jnp.bfloat16))
        stored = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
        table, row = 2048 * 1024 * 2, 1024 * 2  # bfloat16
        kv = 2 * 2 * batch * length * 2 * (1024 // 8) * 2  # k and v: [layers, batch, length, kv heads, head dim]
        expected = stored + kv if tied else stored - table + batch * row + kv
        assert roofline_bytes(model, cache, batch) == expected, tied
