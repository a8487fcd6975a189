"""LoRA: targeting, PEFT's maths (scaling, rsLoRA, dropout on the input only, DoRA), only adapters train,
gradients against a float32 dense reference, LoftQ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.lora import LoraConfig, apply_lora, loftq_initialize, target_module_names, trainable_parameters
from qlora_jax.models import DecoderLM, ModelConfig
from qlora_jax.nn import Frozen, QuantizedWeight
from qlora_jax.quant import QuantConfig, dequantize
from qlora_jax.train.optim import OptimConfig, make_optimizer
from qlora_jax.train.step import TrainState, make_train_step

CONFIG = ModelConfig.from_hf_config(
    dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
)  # fmt: skip
ALL = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
       "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


F32_NF4 = QuantConfig()


def _model(quant=F32_NF4, dtype=jnp.float32, seed=0):
    return DecoderLM(CONFIG, quant=quant, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def _batch(accum=1, batch=2, length=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128, (accum, batch, length)).astype(np.int32)
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=-1)),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape),
        "segment_ids": jnp.ones(tokens.shape, jnp.int32),
    }


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("all-linear", [f"model.layers.{n}" for n in ALL]),
        (("q_proj", "v_proj"), ["model.layers.self_attn.q_proj", "model.layers.self_attn.v_proj"]),
        (r".*mlp\.(up|down)_proj", ["model.layers.mlp.up_proj", "model.layers.mlp.down_proj"]),
        (("lm_head",), ["lm_head"]),
    ],
)
def test_target_modules_select_as_peft_does(target, expected):
    assert sorted(target_module_names(_model(), LoraConfig(target_modules=target))) == sorted(expected)


def test_bad_targets_and_double_application():
    model = _model()
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(model, LoraConfig(target_modules=("nope",)), rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(target_modules=("q_proj",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig(target_modules=("q_proj",)), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "positive integer"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"bias": "all"}, "bias='all' is not supported"),
    ],
)
def test_bad_lora_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_initial_adapters_change_nothing_and_counts_are_peft_like(capsys):
    model = _model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)))
    before = np.asarray(model(tokens))
    apply_lora(model, LoraConfig(r=4), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)  # B starts at zero
    trainable, total = trainable_parameters(model)
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert trainable == 2 * per_layer
    assert total == trainable + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3) + 128 * 64 * 2 + 64 * 2 * 2 + 64
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%:" in capsys.readouterr().out


@pytest.mark.parametrize(("rslora", "scaling"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_and_adapter_output(rslora, scaling):
    model = _model()
    apply_lora(model, LoraConfig(r=4, lora_alpha=16, use_rslora=rslora, init_lora_weights=False,
                                 target_modules=("lm_head",)), rngs=nnx.Rngs(1))  # fmt: skip
    head = model.lm_head
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 64)), jnp.float32)
    expected = x @ head.dense_weight(jnp.float32).T + scaling * (x @ head.lora.lora_A[...].T @ head.lora.lora_B[...].T)
    np.testing.assert_allclose(np.asarray(head(x)), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_dropout_touches_only_the_adapter_input():
    model = _model()
    apply_lora(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=("lm_head",)), rngs=nnx.Rngs(1))
    head = model.lm_head
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 64)), jnp.float32)
    base = head.base(x)
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(head(x, dropout_key=key)), np.asarray(base))  # B = 0: no change
    head.lora.lora_B.set_value(jnp.ones_like(head.lora.lora_B[...]))
    a = head.lora.lora_A[...]
    dropped = np.asarray(head(x, dropout_key=key) - base)  # = 2 * scaling * mask(x) @ A.T @ B.T
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(jax.random.key(0), head.lora.key_id), 0.5, x.shape))
    expected = ((np.asarray(x) * keep * 2) @ np.asarray(a).T) @ np.ones((4, 128)) * head.lora.scaling
    np.testing.assert_allclose(dropped, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(head(x) - base), (np.asarray(x) @ np.asarray(a).T) @ np.ones((4, 128)) *
                               head.lora.scaling, rtol=1e-5, atol=1e-5)  # fmt: skip # no key: eval, no dropout


def test_dora_starts_at_the_base_output_and_follows_peft_formula():
    model = _model()
    apply_lora(model, LoraConfig(r=4, use_dora=True, target_modules=("lm_head",)), rngs=nnx.Rngs(1))
    head = model.lm_head
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 64)), jnp.float32)
    np.testing.assert_allclose(np.asarray(head(x)), np.asarray(head.base(x)), rtol=1e-5, atol=1e-6)
    w = head.dense_weight(jnp.float32)
    np.testing.assert_allclose(np.asarray(head.lora.lora_magnitude_vector[...]), np.linalg.norm(w, axis=1), rtol=1e-6)
    head.lora.lora_B.set_value(jnp.full_like(head.lora.lora_B[...], 0.1))
    head.lora.lora_magnitude_vector.set_value(head.lora.lora_magnitude_vector[...] * 1.5)
    adapted = w + head.lora.delta_weight()
    expected = (
        x @ (head.lora.lora_magnitude_vector[...][:, None] * adapted / jnp.linalg.norm(adapted, axis=1)[:, None]).T
    )
    np.testing.assert_allclose(np.asarray(head(x)), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_only_adapters_train_and_only_they_have_optimizer_state():
    model = _model(quant=QuantConfig(), dtype=jnp.bfloat16)
    apply_lora(model, LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(1))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    base_before = jax.tree.map(np.array, base)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    state = TrainState.create(lora, optimizer)
    lora_bytes = sum(x.nbytes for x in jax.tree.leaves(lora))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert opt_bytes <= 2 * lora_bytes + 64  # Adam's two moments of the adapters, plus counters
    # the optimizer's moments have exactly the adapters' structure: no entry for any base weight
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(lora)
    step = make_train_step(graphdef, optimizer, chunk_size=8)
    losses = []
    for _ in range(3):
        state, metrics = step(state, base, _batch(), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))  # bit-identical base
    assert {type(v) for v in jax.tree.leaves(base, is_leaf=lambda v: isinstance(v, nnx.Variable))} <= {
        Frozen,
        QuantizedWeight,
    }


def test_lora_gradients_equal_a_float32_dense_reference():
    """The 4-bit model (XLA path) and a float32 model holding dequantize(W) give the same adapter gradients."""
    quant = QuantConfig()
    q_model = _model(quant=quant)
    apply_lora(q_model, LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(1))
    dense = _model(quant=None)
    apply_lora(dense, LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(1))
    # the dense model's weights := the 4-bit model's, dequantized; same embeddings, norms and adapters
    q_graph, q_lora, q_base = nnx.split(q_model, nnx.LoRAParam, ...)
    nnx.update(dense, q_lora)
    for path, module in nnx.iter_graph(q_model):
        if hasattr(module, "is_quantized") and module.is_quantized:
            target = dense
            for p in path:
                target = getattr(target, p)
            stacked = jax.vmap(lambda qt: dequantize(qt, jnp.float32))(module.quantized_tensor())
            target.weight.set_value(stacked)
    dense.model.embed_tokens.weight.set_value(q_model.model.embed_tokens.weight[...])
    dense.lm_head.weight.set_value(q_model.lm_head.weight[...])

    def grads(model):
        graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)

        def loss(adapters):
            m = nnx.merge(graphdef, adapters, base)
            logits = m(_batch()["tokens"][0])
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.grad(loss)(lora)

    for g_q, g_d in zip(jax.tree.leaves(grads(q_model)), jax.tree.leaves(grads(dense)), strict=True):
        np.testing.assert_allclose(np.asarray(g_q), np.asarray(g_d), rtol=2e-4, atol=1e-7)


def test_loftq_lowers_the_reconstruction_error():
    rng = np.random.default_rng(0)
    model = _model(quant=QuantConfig(), dtype=jnp.bfloat16)
    weights = {}
    for layer in range(2):
        for name in ALL:
            module = model.model.layers
            for part in name.split("."):
                module = getattr(module, part)
            shape = (module.out_features, module.in_features)
            # low-rank structure plus noise: what LoftQ's SVD can capture
            low_rank = rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1]))
            weights[f"model.layers.{layer}.{name}.weight"] = 0.05 * low_rank + 0.01 * rng.standard_normal(shape)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights="loftq", loftq_iter=3)
    errors = loftq_initialize(model, weights, config, names=[f"model.layers.{n}" for n in ALL])
    for name, (plain, loftq) in errors.items():
        assert loftq < 0.8 * plain, (name, plain, loftq)
    # the model now holds dequant(Q) + s B A, the LoftQ reconstruction, for every layer
    q_proj = model.model.layers.self_attn.q_proj
    residuals = []
    for layer in range(2):
        qt = jax.tree.map(lambda a, i=layer: a[i], q_proj.quantized_tensor())
        delta = q_proj.lora.lora_B[...][layer] @ q_proj.lora.lora_A[...][layer]
        w_hat = dequantize(qt, jnp.float32) + config.scaling * delta
        residuals.append(np.linalg.norm(weights[f"model.layers.{layer}.self_attn.q_proj.weight"] - np.asarray(w_hat)))
    assert np.sqrt(np.sum(np.square(residuals))) == pytest.approx(errors["model.layers.self_attn.q_proj"][1], rel=1e-4)
