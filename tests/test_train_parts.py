"""The training parts on their own: chunked loss, schedules, the YAML config, offloaded optimizer state,
remat policies, non-finite losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from qlora_jax.kernels import KernelOptions
from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.models import REMAT_POLICIES, ComputeOptions, DecoderLM, ModelConfig
from qlora_jax.quant import QuantConfig
from qlora_jax.train.config import ConfigFieldError, load_config
from qlora_jax.train.loss import IGNORE_INDEX, auto_chunk_size, chunked_cross_entropy, cross_entropy_reference
from qlora_jax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
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
VOCAB = CONFIG.vocab_size


def _trainable(seed=0, dropout=0.0, dtype=jnp.bfloat16):
    model = DecoderLM(CONFIG, quant=QuantConfig(), dtype=dtype, rngs=nnx.Rngs(seed))
    apply_lora(model, LoraConfig(r=4, lora_dropout=dropout, init_lora_weights=False), rngs=nnx.Rngs(1))
    return nnx.split(model, nnx.LoRAParam, ...)


def test_chunked_loss_equals_full_logits_and_ignores_masked_tokens():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7))).at[0, :3].set(IGNORE_INDEX)
    loss, count = chunked_cross_entropy(lambda x: x @ w, h, targets, chunk_size=4)  # 21 tokens: a ragged chunk
    ref_loss, ref_count = cross_entropy_reference(h @ w, targets)
    assert int(count) == int(ref_count) == 18
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    grad = jax.grad(lambda h: chunked_cross_entropy(lambda x: x @ w, h, targets, chunk_size=4)[0])(h)
    ref_grad = jax.grad(lambda h: cross_entropy_reference(h @ w, targets)[0])(h)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_all_logits():
    """XLA's buffers for the chunked loss (with its gradient) stay far below one [tokens, vocab] float32 array."""
    tokens, vocab, dim = 4096, 8192, 64
    w = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    h = jax.ShapeDtypeStruct((tokens, dim), jnp.float32)
    t = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def temp_bytes(fn):
        return jax.jit(jax.value_and_grad(fn)).lower(h, w, t).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda h, w, t: chunked_cross_entropy(lambda x: x @ w, h, t, chunk_size=512)[0])
    full = temp_bytes(lambda h, w, t: cross_entropy_reference(h @ w, t)[0])
    all_logits, chunk_logits = tokens * vocab * 4, 512 * vocab * 4
    assert full >= all_logits
    assert chunked <= 2.5 * chunk_logits, (chunked, chunk_logits)  # one chunk's logits and their gradient


def test_automatic_loss_chunk_bounds_the_logits_by_vocabulary():
    assert auto_chunk_size(49152) == 1024  # SmolLM2: 192 MiB of float32 logits
    assert auto_chunk_size(128256) == 512  # Llama 3
    assert auto_chunk_size(256000) == 256  # Gemma
    assert auto_chunk_size(32000) == 1024  # never more than 1024 tokens
    assert auto_chunk_size(10_000_000) == 128  # never fewer than 128
    for vocab in (32000, 49152, 128256, 151936, 256000, 262208):
        assert auto_chunk_size(vocab) * vocab * 4 <= 2**28


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_decay(schedule):
    fn = learning_rate_schedule(OptimConfig(learning_rate=1e-3, schedule=schedule, warmup_steps=10), 110)
    assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(5e-4) and float(fn(10)) == pytest.approx(1e-3)
    end = float(fn(110))
    assert end == pytest.approx(1e-3) if schedule == "constant" else end == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("schedule", "cosin", "schedule must be one of"),  # was taken for cosine
        ("optimizer", "sgd", "optimizer must be one of"),
        ("learning_rate", 0.0, "learning_rate must be > 0"),
        ("warmup_steps", -1, "warmup_steps must be >= 0"),
        ("end_lr_fraction", 2.0, r"end_lr_fraction must be in \[0, 1\]"),
        ("max_grad_norm", 0.0, "max_grad_norm must be > 0 or None"),
        ("eps", 0.0, r"eps must be > 0, got 0.0"),
        ("eps", float("nan"), r"eps must be > 0, got nan"),
        ("beta1", 1.0, r"beta1 must be in \[0, 1\), got 1.0"),
        ("beta2", 1.0, r"beta2 must be in \[0, 1\), got 1.0"),
        ("beta2", -0.5, r"beta2 must be in \[0, 1\), got -0.5"),
        ("weight_decay", -0.01, r"weight_decay must be >= 0, got -0.01"),
    ],
)
def test_optimizer_config_checks_itself(field, value, match):
    """The library's optimizer config needs no YAML schema to be checked; the YAML's `optim` section is it."""
    with pytest.raises(ValueError, match=match):
        OptimConfig(**{field: value})


def test_the_yaml_optim_section_is_the_optimizer_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "m"},
                "data": {"train": "t.jsonl"},
                "optim": {"learning_rate": 1e-3, "schedule": "linear"},
            }
        )
    )
    assert load_config(path).optim == OptimConfig(learning_rate=1e-3, schedule="linear")


def test_gradient_accumulation_equals_one_big_batch():
    import optax

    graphdef, lora, base = _trainable(dtype=jnp.float32)
    optimizer = optax.sgd(1.0)  # the update is the gradient itself
    batch = token_batch(VOCAB, accum=2, rows=2)
    big = jax.tree.map(lambda x: x.reshape(1, 4, *x.shape[2:]), batch)
    results = []
    for b in (batch, big):
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
        state, metrics = make_train_step(graphdef, optimizer, chunk_size=16)(state, base, b, jax.random.key(0))
        results.append((float(metrics["loss"]), state.lora))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", REMAT_POLICIES)
def test_remat_policies_give_the_same_gradients(remat):
    graphdef, lora, base = _trainable()
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    losses = {}
    for policy in ("none", remat):
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
        step = make_train_step(graphdef, optimizer, chunk_size=16, options=ComputeOptions(remat=policy))
        state, metrics = step(state, base, token_batch(VOCAB), jax.random.key(0))
        losses[policy] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    assert losses[remat] == pytest.approx(losses["none"], rel=1e-5)


def _packed_batch():
    """Two rows: two packed examples and right padding; one example and right padding."""
    batch = token_batch(VOCAB, accum=1, rows=2, length=16)
    segments = np.array([[[1] * 6 + [2] * 7 + [0] * 3, [1] * 11 + [0] * 5]], np.int32)
    positions = np.array([[list(range(6)) + list(range(7)) + [0] * 3, list(range(11)) + [0] * 5]], np.int32)
    targets = np.where(segments > 0, np.asarray(batch["targets"]), IGNORE_INDEX)
    return batch | {
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(positions),
        "targets": jnp.asarray(targets),
    }


def test_flash_attention_step_equals_the_xla_step():
    """Loss, gradient norm and gradients (an SGD step of rate 1 subtracts them) of a step through the Pallas flash
    kernel (interpreted), packed rows, padding and LoRA dropout included, equal the XLA attention's."""
    graphdef, lora, base = _trainable(dtype=jnp.float32, dropout=0.1)
    optimizer = optax.sgd(1.0)
    results = []
    for attention in ("xla", "pallas"):
        options = ComputeOptions(remat="full", attention=attention, kernels=KernelOptions(interpret=True))
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
        state, metrics = make_train_step(graphdef, optimizer, chunk_size=16, options=options)(
            state, base, _packed_batch(), jax.random.key(0)
        )
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), state.lora))
    assert results[1][:2] == pytest.approx(results[0][:2], rel=1e-5)
    for a, b, before in zip(*(jax.tree.leaves(r[2]) for r in results), jax.tree.leaves(lora), strict=True):
        grad_xla, grad_pallas = np.asarray(before) - np.asarray(a), np.asarray(before) - np.asarray(b)
        np.testing.assert_allclose(grad_pallas, grad_xla, rtol=1e-4, atol=1e-4 * np.abs(grad_xla).max())


def test_unpacked_rows_need_no_segment_ids():
    """Rows of one example then right padding: the step with packed_rows=False (causal mask only) computes the
    same loss and gradients as with the segment mask."""
    graphdef, lora, base = _trainable(dtype=jnp.float32)
    batch = _packed_batch()
    batch["segment_ids"] = jnp.where(batch["segment_ids"] > 0, 1, 0)  # one example a row
    batch["positions"] = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), batch["tokens"].shape)
    optimizer = optax.sgd(1.0)
    results = []
    for packed_rows in (True, False):
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
        step = make_train_step(
            graphdef,
            optimizer,
            chunk_size=16,
            packed_rows=packed_rows,
            options=ComputeOptions(remat="none", attention="xla"),
        )
        state, metrics = step(state, base, batch, jax.random.key(0))
        results.append((float(metrics["loss"]), state.lora))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_offloaded_optimizer_state_lives_in_pinned_host_memory():
    graphdef, lora, base = _trainable()
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    runs = {}
    for offload in (False, True):
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer, offload=offload)
        step = make_train_step(graphdef, optimizer, chunk_size=16, offload_optimizer=offload)
        losses = []
        for _ in range(3):
            state, metrics = step(state, base, token_batch(VOCAB), jax.random.key(0))
            losses.append(float(metrics["loss"]))
            kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)}
            assert kinds == ({"pinned_host"} if offload else {"device"})
        runs[offload] = losses
    assert runs[True] == runs[False]


def test_non_finite_loss_skips_the_update():
    graphdef, lora, base = _trainable()
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim else x, lora)
    state = TrainState.create(poisoned, optimizer)
    before = jax.tree.map(np.array, state)
    state, metrics = make_train_step(graphdef, optimizer, chunk_size=16)(
        state, base, token_batch(VOCAB), jax.random.key(0)
    )
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(before.lora), jax.tree.leaves(state.lora), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # nothing applied


def _write(tmp_path, config, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_config_with_overrides(tmp_path):
    path = _write(
        tmp_path,
        {
            "model": {"path": "model.gguf"},
            "data": {"train": "train.jsonl"},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    config = load_config(path, ["--lora.r", "32", "--optim.learning_rate", "1e-3", "--train.samples", "[hi, there]"])
    assert config.lora.r == 32 and config.lora.target_modules == ("q_proj", "v_proj")
    assert config.optim.learning_rate == 1e-3 and config.train.samples == ("hi", "there")
    assert config.model.path == str(tmp_path / "model.gguf")  # relative to the YAML file
    assert config.data.train == str(tmp_path / "train.jsonl")


@pytest.mark.parametrize(
    ("change", "overrides", "match"),
    [
        ({"lora": {"rr": 8}}, [], r"lora.rr: unknown field \(did you mean 'r'\?\)"),
        ({"lora": {"r": "eight"}}, [], "lora.r: expected an integer, got 'eight'"),
        ({"train": {"grad_accum": 3}}, [], "train.grad_accum: must divide batch_size=8"),
        ({"optim": {"schedule": "exp"}}, [], "optim: schedule must be one of"),
        ({"optim": {"learning_rate": 0}}, [], "optim: learning_rate must be > 0, got 0"),
        ({"optim": {"eps": 0}}, [], "optim: eps must be > 0, got 0"),
        ({}, ["--optim.beta1", "1.0"], r"optim: beta1 must be in \[0, 1\), got 1.0"),
        ({"optim": {"weight_decay": -0.1}}, [], "optim: weight_decay must be >= 0, got -0.1"),
        ({}, ["--mesh.heartbeat_timeout_seconds", "0"], r"mesh.heartbeat_timeout_seconds: must be >= 1 \(seconds\)"),
        ({"model": {"quant": "nf3"}}, [], "model.quant: must be one of"),
        ({"trian": {}}, [], r"unknown section 'trian' \(did you mean 'train'\?\)"),
        ({}, ["--lora.r"], "has no value"),
        ({}, ["lora.r", "3"], "--section.field value"),
        ({"lora": {"r": 0}}, [], "lora: lora r must be a positive integer"),
        ({"train": {"loss_chunk_size": -1}}, [], r"train.loss_chunk_size: must be >= 0 \(0: automatic\)"),
        ({"train": {"attention_block": -2}}, [], "train.attention_block: must be >= 0, got -2"),
        ({"train": {"attention": "flash"}}, [], "train.attention: must be one of"),
        ({"train": {"attention": "cudnn"}}, [], "train.attention: cudnn has no mask for packed rows"),
        ({"train": {"memory_budget": "lots"}}, [], "train.memory_budget: expected a number of bytes or a size"),
        ({"train": {"memory_budget": -3}}, [], "train.memory_budget: a memory size must be > 0"),
        ({"train": {"remat": "sometimes"}}, [], r"train.remat: must be one of \('auto', 'none'"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, change, overrides, match):
    base = {"model": {"path": "m.gguf"}, "data": {"train": "t.jsonl"}}
    for section, fields in change.items():
        base.setdefault(section, {}).update(fields)
    path = _write(tmp_path, base)
    with pytest.raises(ConfigFieldError, match=match):
        load_config(path, overrides)
    assert str(path) in str(pytest.raises(ConfigFieldError, load_config, path, overrides).value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigFieldError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigFieldError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    path = _write(tmp_path, {"data": {"train": "t.jsonl"}})
    with pytest.raises(ConfigFieldError, match="required section 'model' is missing"):
        load_config(path)
    path = _write(tmp_path, {"model": {"quant": "nf4"}, "data": {"train": "t.jsonl"}})
    with pytest.raises(ConfigFieldError, match="model: required field 'path' is missing"):
        load_config(path)


def test_compute_options_are_what_the_step_compiles():
    """The kernel choice and the checkpointing policy are arguments: each value compiles its own program, and a
    step made for one value never runs another (nothing is read from global state while tracing)."""
    import optax

    graphdef, lora, base = _trainable()
    optimizer = optax.sgd(1e-2)
    batch, key = token_batch(VOCAB, accum=1), jax.random.key(0)
    fused = ComputeOptions(remat="full", kernels=KernelOptions(impl="pallas", interpret=True))
    programs = {}
    for name, options in (("xla", ComputeOptions(remat="none")), ("fused", fused)):
        state = jax.eval_shape(lambda adapters: TrainState.create(adapters, optimizer), lora)
        step = make_train_step(graphdef, optimizer, chunk_size=16, options=options)
        programs[name] = str(jax.make_jaxpr(step)(state, base, batch, key))
    assert "pallas_call" not in programs["xla"] and "pallas_call" in programs["fused"]
    assert programs["fused"].count("remat2[") > programs["xla"].count("remat2[")  # the layer remat
    # Equal losses either way: only how it is computed differs.
    losses = []
    for options in (ComputeOptions(), fused):
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
        _, metrics = make_train_step(graphdef, optimizer, chunk_size=16, options=options)(state, base, batch, key)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_compute_options_reject_unknown_values():
    with pytest.raises(ValueError, match="remat policy must be one of"):
        ComputeOptions(remat="sometimes")
    with pytest.raises(ValueError, match="attention_block must be >= 0"):
        ComputeOptions(attention_block=-1)
    with pytest.raises(ValueError, match="impl must be one of"):
        KernelOptions(impl="triton")
    with pytest.raises(ValueError, match="attention must be one of"):
        ComputeOptions(attention="flash")


def test_memory_sizes_parse_in_si_and_binary_units():
    from qlora_jax.train.config import parse_bytes

    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("8 GB") == 8 * 10**9
    assert parse_bytes("1.5MiB") == 3 * 2**19
    assert parse_bytes(4096) == 4096
    for bad in ("", "12 parsecs", "GiB", 0, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("name", ["smollm2_dates.yaml", "llama8b_plan.yaml"])
def test_example_configs_load(name):
    """The shipped configs are valid, their paths resolve, and the 8B planning example is Llama-3.1-8B's shape."""
    from pathlib import Path

    from qlora_jax.models import read_model_config
    from qlora_jax.train.config import resolve_package_path

    examples = Path(__file__).resolve().parents[1] / "examples"
    config = load_config(examples / name)
    assert Path(config.data.train).is_file()
    if name == "llama8b_plan.yaml":
        model = read_model_config(resolve_package_path(config.model.path))
        assert (model.num_layers, model.hidden_size, model.intermediate_size, model.vocab_size) == (
            32,
            4096,
            14336,
            128256,
        )
        assert (model.num_heads, model.num_kv_heads, model.rope.rope_type) == (32, 8, "llama3")
        assert config.train.remat == "auto"


def test_the_kernel_choice_is_a_config_field(tmp_path):
    """train.kernels reaches the steps' KernelOptions (with the plan's GPU target beside it); an unknown value is
    refused naming the field."""
    from qlora_jax.train.build import compute_options

    base = {"model": {"path": "m", "quant": "nf4"}, "data": {"train": "t.jsonl"}, "train": {"remat": "full"}}
    config = load_config(_write(tmp_path, base), ["--train.kernels", "pallas"])
    kernels = compute_options(config).kernels
    assert (kernels.impl, kernels.target) == ("pallas", None)
    assert kernels.tuning is not None  # this machine's measurements, read once (an empty cache: no choices)
    assert compute_options(config, target="h200").kernels.target == "h200"
    assert compute_options(load_config(_write(tmp_path, base))).kernels.impl == "auto"
    with pytest.raises(ConfigFieldError, match=r"train.kernels.*must be one of"):
        load_config(_write(tmp_path, base), ["--train.kernels", "triton"])
