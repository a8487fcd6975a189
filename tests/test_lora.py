"""LoRA: targeting, PEFT's maths (scaling, rsLoRA, dropout on the input only, DoRA), only adapters train,
gradients against a float32 dense reference, LoftQ."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.lora import (
    AdapterScaling,
    LoraConfig,
    apply_lora,
    loftq_initialize,
    target_layers,
    target_module_names,
    trainable_parameters,
)
from qlora_jax.models import DecoderLM, ModelConfig
from qlora_jax.models.names import layer_name, split_layer_name
from qlora_jax.nn import Frozen, QuantizedWeight
from qlora_jax.quant import QuantConfig, dequantize
from qlora_jax.train.config import ConfigFieldError, load_config
from qlora_jax.train.optim import OptimConfig, make_optimizer
from qlora_jax.train.step import TrainState, make_train_step
from tests.helpers import token_batch

CONFIG = ModelConfig.from_hf_config(
    dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
    )
)
ALL = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


F32_NF4 = QuantConfig()


def _model(quant=F32_NF4, dtype=jnp.float32, seed=0):
    return DecoderLM(CONFIG, quant=quant, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("all-linear", [f"model.layers.{n}" for n in ALL]),
        (("q_proj", "v_proj"), ["model.layers.self_attn.q_proj", "model.layers.self_attn.v_proj"]),
        (r".*mlp\.(up|down)_proj", ["model.layers.mlp.up_proj", "model.layers.mlp.down_proj"]),
        (("lm_head",), ["lm_head"]),
        # PEFT's names carry the layer index: a regex may name some layers, or all of them
        (
            r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
            ["model.layers.self_attn.q_proj", "model.layers.self_attn.v_proj"],
        ),
        (r"model\.layers\.1\.mlp\.down_proj", ["model.layers.mlp.down_proj"]),
        ((), None),
    ],
)
def test_target_modules_select_as_peft_does(target, expected):
    if expected is None:
        with pytest.raises(ValueError, match="target_modules must name at least one module"):
            LoraConfig(target_modules=target)
        return
    assert sorted(target_module_names(_model(), LoraConfig(target_modules=target))) == sorted(expected)
    if target == r"model\.layers\.1\.mlp\.down_proj":
        assert target_layers(_model(), LoraConfig(target_modules=target))[expected[0]].ranks == (0, 8)


def test_per_layer_names():
    assert layer_name("model.layers.self_attn.q_proj", 3) == "model.layers.3.self_attn.q_proj"
    assert layer_name("model.layers", 0) == "model.layers.0" and layer_name("lm_head", None) == "lm_head"
    assert split_layer_name("model.layers.12.mlp.up_proj") == ("model.layers.mlp.up_proj", 12)
    assert split_layer_name("model.layers.2") == ("model.layers", 2) and split_layer_name("lm_head") == (
        "lm_head",
        None,
    )
    with pytest.raises(ValueError, match="not a path in model.layers"):
        layer_name("lm_head", 1)


def test_lora_fields_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {path: m}\ndata: {train: t.jsonl}\n"
        "lora: {target_modules: [q_proj, v_proj], layers_to_transform: [0, 2], rank_pattern: {v_proj: 16}}\n"
    )
    config = load_config(path, ["--lora.alpha_pattern", "{q_proj: 32}", "--lora.exclude_modules", "[k_proj]"]).lora
    assert config == LoraConfig(
        target_modules=("q_proj", "v_proj"),
        layers_to_transform=(0, 2),
        exclude_modules=("k_proj",),
        rank_pattern={"v_proj": 16},
        alpha_pattern={"q_proj": 32.0},
    )
    assert hash(config) == hash(dataclasses.replace(config))
    with pytest.raises(ConfigFieldError, match=r"lora.rank_pattern\['v_proj'\]: expected an integer, got 'x'"):
        load_config(path, ["--lora.rank_pattern", "{v_proj: x}"])


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
        ({"lora_alpha": 0}, "lora_alpha must be a finite nonzero number"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a finite nonzero"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform cannot be used when"),
        ({"target_modules": ("q_proj",), "layers_pattern": "layers"}, "layers_to_transform must be specified too"),
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
    # B starts at zero: the adapters add exactly 0 (up to how XLA fuses the now larger layer scan: 1 ulp)
    np.testing.assert_allclose(np.asarray(model(tokens)), before, rtol=0, atol=1e-6 * np.abs(before).max())
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.lm_head(x)), np.asarray(model.lm_head.base(x)))
    trainable, total = trainable_parameters(model)
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert trainable == 2 * per_layer
    assert total == trainable + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3) + 128 * 64 * 2 + 64 * 2 * 2 + 64
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%:" in capsys.readouterr().out


@pytest.mark.parametrize(("rslora", "scaling"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_and_adapter_output(rslora, scaling):
    model = _model()
    apply_lora(
        model,
        LoraConfig(r=4, lora_alpha=16, use_rslora=rslora, init_lora_weights=False, target_modules=("lm_head",)),
        rngs=nnx.Rngs(1),
    )
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
    np.testing.assert_allclose(
        np.asarray(head(x) - base),
        (np.asarray(x) @ np.asarray(a).T) @ np.ones((4, 128)) * head.lora.scaling,
        rtol=1e-5,
        atol=1e-5,
    )  # no key: eval, no dropout


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
        state, metrics = step(state, base, token_batch(CONFIG.vocab_size, accum=1), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))  # bit-identical base
    assert {type(v) for v in jax.tree.leaves(base, is_leaf=lambda v: isinstance(v, nnx.Variable))} <= {
        Frozen,
        QuantizedWeight,
        AdapterScaling,  # fixed by the config, not trained
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
            logits = m(token_batch(CONFIG.vocab_size, accum=1)["tokens"][0])
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


# ------------------------------------------------------------------------- adapters on some layers, per-layer rank

PER_LAYER = LoraConfig(
    r=4,
    lora_alpha=8,
    init_lora_weights=False,
    target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj|lm_head",
    rank_pattern={"v_proj": 2, "lm_head": 6},
    alpha_pattern={"q_proj": 2},
)


def test_layers_without_adapters_and_rank_padding_stay_exactly_zero_through_training():
    """Stacked modules hold every layer's adapter at the largest rank: layers without one and the padding of
    smaller ranks add nothing, get exactly zero gradient, and stay zero under AdamW with weight decay and
    clipping; DoRA's magnitude there gets no gradient either."""
    model = _model(quant=QuantConfig(), dtype=jnp.bfloat16)
    config = dataclasses.replace(PER_LAYER, use_dora=True)
    assert sorted(apply_lora(model, config, rngs=nnx.Rngs(1))) == [
        "lm_head",
        "model.layers.self_attn.q_proj",
        "model.layers.self_attn.v_proj",
    ]
    q, v, head = (
        model.model.layers.self_attn.q_proj.lora,
        model.model.layers.self_attn.v_proj.lora,
        model.lm_head.lora,
    )
    assert (q.ranks, v.ranks, head.ranks) == ((0, 4), (0, 2), (6,))
    assert q.lora_A[...].shape == (2, 4, 64) and v.lora_B[...].shape == (2, 32, 2) and head.lora_A[...].shape == (6, 64)
    np.testing.assert_allclose(np.asarray(q.scaling[...]), [0, 2 / 4])
    np.testing.assert_allclose(np.asarray(v.scaling[...]), [0, 8 / 2])
    trainable, _ = trainable_parameters(model, verbose=False)
    assert trainable == 4 * (64 + 64) + 64 + 2 * (64 + 32) + 32 + 6 * (64 + 128) + 128  # PEFT's count, no padding
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5), 10)
    state = TrainState.create(lora, optimizer)
    step = make_train_step(graphdef, optimizer, chunk_size=8)

    def grads_of(adapters):
        def loss(a):
            m = nnx.merge(graphdef, a, base)
            return jnp.mean(
                jax.nn.log_softmax(m(token_batch(CONFIG.vocab_size, accum=1)["tokens"][0]).astype(jnp.float32))[..., 0]
            )

        return nnx.to_flat_state(jax.grad(loss)(adapters))

    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in grads_of(lora)}
    assert not flat["model.layers.self_attn.q_proj.lora.lora_A"][0].any()  # layer 0 has none
    assert not flat["model.layers.self_attn.q_proj.lora.lora_magnitude_vector"][0].any()
    assert flat["model.layers.self_attn.q_proj.lora.lora_magnitude_vector"][1].any()
    for _ in range(3):
        state, _ = step(state, base, token_batch(CONFIG.vocab_size, accum=1), jax.random.key(0))
    after = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.lora)}
    for module, r in (("q_proj", 4), ("v_proj", 2)):
        a, b = (
            after[f"model.layers.self_attn.{module}.lora.lora_A"],
            after[f"model.layers.self_attn.{module}.lora.lora_B"],
        )
        assert not a[0].any() and not b[0].any(), module  # the layer without an adapter
        assert not a[1, r:].any() and not b[1, :, r:].any(), module  # padding past the layer's rank
        assert a[1, :r].all() and b[1, :, :r].any(), module  # what trains, trains
