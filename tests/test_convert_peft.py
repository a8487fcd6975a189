"""Adapters to and from PEFT, and merged exports, verified in transformers and PEFT."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.convert.merge import merge_and_save
from qlora_jax.convert.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PeftFormatError,
    load_peft_adapter,
    read_adapter_config_dict,
    save_peft_adapter,
)
from qlora_jax.lora import LoraConfig, apply_lora, target_layers
from qlora_jax.models.names import layer_name
from qlora_jax.quant import QuantConfig
from tests.helpers import assert_close
from tests.models_util import hf_logits, load_hf_model, make_tiny_model, torch, transformers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 9))


@pytest.fixture(scope="module", params=["llama", "phi3"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, directory)
    return directory


def _ours_with_adapter(directory, lora_config, quant=None, seed=3):
    model, _ = load_pretrained(directory, quantization=quant, dtype=jnp.float32)
    apply_lora(model, lora_config, rngs=nnx.Rngs(seed))
    # a trained-looking adapter: B and the DoRA magnitudes away from their initial values
    for _, module in nnx.iter_graph(model):
        if getattr(module, "lora", None) is not None:
            b = module.lora.lora_B
            b.set_value(np.random.default_rng(seed).standard_normal(b[...].shape).astype(np.float32) * 0.05)
            if module.lora.lora_magnitude_vector is not None:
                m = module.lora.lora_magnitude_vector
                m.set_value(m[...] * 1.3)
    return model


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=4, lora_alpha=8),
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=("q_proj", "v_proj", "down_proj")),
        LoraConfig(r=2, lora_alpha=4, use_dora=True),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_peft_loads_our_adapter_and_computes_our_logits(tiny, tmp_path, lora_config):
    model = _ours_with_adapter(tiny, lora_config)
    save_peft_adapter(model, tmp_path / "adapter", lora_config, base_model_name_or_path=str(tiny))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == lora_config.r and config["use_dora"] == lora_config.use_dora
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(tiny), tmp_path / "adapter").eval()
    theirs = hf_logits(peft_model, TOKENS)
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert np.abs(theirs - hf_logits(load_hf_model(tiny), TOKENS)).max() > 1e-3  # the adapter matters
    assert_close(ours, theirs)


def _peft_round_trip(base_dir, tmp_path, peft_config) -> LoraConfig:
    """A random PEFT adapter saved by PEFT loads here with PEFT's logits, and saved again from here (PEFT's config
    as template) it is the same config and the same tensors, bit for bit. Returns the config read here."""
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(load_hf_model(base_dir), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    model, _ = load_pretrained(base_dir, quantization=None, dtype=jnp.float32)
    config = load_peft_adapter(model, tmp_path / "theirs")
    assert_close(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(peft_model, TOKENS))
    template = read_adapter_config_dict(tmp_path / "theirs")
    save_peft_adapter(model, tmp_path / "again", config, template=template)
    assert read_adapter_config_dict(tmp_path / "again") == template
    before, after = load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS), load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    return config


def test_peft_to_ours_to_peft_round_trip_changes_nothing(tiny, tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM", use_rslora=True
    )
    ours_config = _peft_round_trip(tiny, tmp_path, config)
    assert ours_config.r == 4 and ours_config.use_rslora


@pytest.mark.parametrize("quant", [None, QuantConfig()], ids=["dense", "nf4"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_checkpoint_gives_our_unmerged_logits(tiny, tmp_path, quant, dora):
    lora_config = LoraConfig(r=4, lora_alpha=8, use_dora=dora)
    model = _ours_with_adapter(tiny, lora_config, quant=quant)
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = load_hf_model(tmp_path / "merged")
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert_close(hf_logits(merged, TOKENS), ours)


def test_merged_and_requantized_loads_in_bitsandbytes(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = _ours_with_adapter(tiny, LoraConfig(r=4))
    merge_and_save(model, tmp_path / "merged4", dtype=jnp.float32, quant=QuantConfig())
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged4", device_map="cpu").eval()
    assert type(hf4.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ours4, _ = load_pretrained(tmp_path / "merged4", dtype=jnp.float32)
    ours = np.asarray(ours4(jnp.asarray(TOKENS)))
    assert_close(hf_logits(hf4, TOKENS), ours)
    # 4-bit rounding away from the 16-bit merge, but close
    full = np.asarray(model(jnp.asarray(TOKENS)))
    assert np.abs(ours - full).max() < 0.2 * np.abs(full).max()


def test_bad_adapters_fail_clearly(tiny, tmp_path):
    model = _ours_with_adapter(tiny, LoraConfig(r=4))
    save_peft_adapter(model, tmp_path / "a", LoraConfig(r=4))
    fresh, _ = load_pretrained(tiny, quantization=None, dtype=jnp.float32)

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "a", other)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(other / ADAPTER_WEIGHTS)
    renamed = {k.replace("self_attn.o_proj", "attn.c_proj"): v for k, v in tensors.items()}
    save_file(renamed, other / ADAPTER_WEIGHTS)
    with pytest.raises(PeftFormatError, match="attn.c_proj is not a linear layer of this .* another architecture"):
        load_peft_adapter(fresh, other)

    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "a", wrong)
    config = json.loads((wrong / ADAPTER_CONFIG).read_text()) | {"r": 8}
    (wrong / ADAPTER_CONFIG).write_text(json.dumps(config))
    fresh, _ = load_pretrained(tiny, quantization=None, dtype=jnp.float32)
    with pytest.raises(PeftFormatError, match=r"lora_A has shape \(4, \d+\), the model needs \(8, \d+\)"):
        load_peft_adapter(fresh, wrong)

    (wrong / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(PeftFormatError, match="not a readable safetensors file"):
        load_peft_adapter(fresh, wrong)
    (wrong / ADAPTER_CONFIG).unlink()
    with pytest.raises(PeftFormatError, match="cannot read the adapter config"):
        load_peft_adapter(fresh, wrong)


# ---------------------------------------------------------------------- PEFT's targeting, per layer and rank

LAYERS = 4
# PEFT LoraConfig keyword arguments; each selects adapters on some layers only, or with per-layer ranks / alphas.
SELECTIONS = {
    "regex-q-v": dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"),  # the regex
    "regex-some-layers": dict(target_modules=r"model\.layers\.[13]\.mlp\.(gate|down)_proj"),
    "regex-suffix": dict(target_modules=r".*\.(k|o)_proj"),
    "regex-with-head": dict(target_modules=r"(.*\.0\.self_attn\.q_proj|lm_head)"),
    "names-and-head": dict(target_modules=["q_proj", "lm_head"]),
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    "layers_pattern": dict(
        target_modules=["self_attn.q_proj", "up_proj"], layers_to_transform=3, layers_pattern="layers"
    ),
    "whole-name-ignores-layers": dict(target_modules=["model.layers.1.mlp.up_proj", "q_proj"], layers_to_transform=[2]),
    "exclude-regex": dict(target_modules="all-linear", exclude_modules=r".*\.[02]\..*"),
    "exclude-names": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], exclude_modules=["k_proj"]),
    "rank-alpha-patterns": dict(
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2, r"layers\.3\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 32, r"model\.layers\.0\..*": 3},
    ),
    "rslora-patterns": dict(
        target_modules="all-linear", r=4, use_rslora=True, rank_pattern={"mlp.up_proj": 8}, alpha_pattern={"o_proj": 2}
    ),
}


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama4")
    make_tiny_model("llama", directory, num_hidden_layers=LAYERS)
    return directory


def _peft_layout(peft_model) -> dict[str, tuple[int, float]]:
    """{PEFT's module name: (r, scaling)} of every adapted module."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name] = (module.r["default"], module.scaling["default"])
    return out


def _our_layout(model, config) -> dict[str, tuple[int, float]]:
    out = {}
    for path, target in target_layers(model, config).items():
        for i, (r, s) in enumerate(zip(target.ranks, target.scalings(config.use_rslora), strict=True)):
            if r:
                out[layer_name(path, i if target.stacked else None)] = (r, pytest.approx(s))
    return out


@pytest.mark.parametrize("kwargs", SELECTIONS.values(), ids=SELECTIONS.keys())
def test_targets_ranks_and_alphas_select_what_peft_selects(tiny4, kwargs):
    peft_model = peft.get_peft_model(load_hf_model(tiny4), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    theirs = _peft_layout(peft_model)
    model, _ = load_pretrained(tiny4, quantization=None, dtype=jnp.float32)
    config = LoraConfig(**kwargs)
    assert _our_layout(model, config) == theirs
    assert 0 < len(theirs) < 7 * LAYERS + 1 or kwargs.get("target_modules") == "all-linear"


@pytest.mark.parametrize(
    ("kwargs", "ours"),
    [
        # the issue: a regex over our stacked paths, which PEFT's names never match
        (dict(target_modules=r"model\.layers\.self_attn\.(q|v)_proj"), "matches no linear layer"),
        (dict(target_modules=r".*input_layernorm"), r"selects model\.layers\.0\.input_layernorm, a RMSNorm"),
        (dict(target_modules=["q_proj", "embed_tokens"]), r"selects model\.embed_tokens, a Embed"),
        (dict(target_modules=["self_attn"]), r"selects model\.layers\.0\.self_attn, a Attention"),
    ],
    ids=["stacked-path-regex", "norm", "embedding", "container"],
)
def test_selections_peft_refuses_or_we_cannot_adapt_are_errors(tiny4, kwargs, ours):
    model, _ = load_pretrained(tiny4, quantization=None, dtype=jnp.float32)
    with pytest.raises(ValueError, match=ours):
        apply_lora(model, LoraConfig(**kwargs), rngs=nnx.Rngs(0))
    if "embed_tokens" not in str(kwargs):  # (PEFT adapts embeddings; we do not)
        with pytest.raises(ValueError):
            peft.get_peft_model(load_hf_model(tiny4), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def test_a_tied_head_in_target_modules_is_refused(tmp_path):
    make_tiny_model("qwen2", tmp_path)  # tie_word_embeddings
    model, _ = load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    # PEFT adapts both; silently adapting q_proj only would train something else than asked
    assert {
        n.split(".")[-1]
        for n in _peft_layout(
            peft.get_peft_model(
                load_hf_model(tmp_path), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"])
            )
        )
    } == {"q_proj", "lm_head"}
    with pytest.raises(ValueError, match="selects lm_head, but this model ties its output head to model.embed_tok"):
        apply_lora(model, LoraConfig(target_modules=("q_proj", "lm_head")), rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(target_modules="all-linear"), rngs=nnx.Rngs(0))  # all-linear leaves the head out


EXPORTS = [
    "regex-q-v",
    "regex-some-layers",
    "regex-with-head",
    "layers_to_transform",
    "exclude-regex",
    "rank-alpha-patterns",
    "rslora-patterns",
]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", EXPORTS)
def test_peft_loads_our_per_layer_adapters_with_equal_logits(tiny4, tmp_path, name, dora):
    config = LoraConfig(**SELECTIONS[name], use_dora=dora)
    model = _ours_with_adapter(tiny4, config)  # (B random everywhere, padding and unadapted layers included)
    save_peft_adapter(model, tmp_path / "adapter", config, base_model_name_or_path=str(tiny4))
    written = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    layout = _our_layout(model, config)
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in written} == set(layout)
    for key, value in written.items():
        if key.endswith("lora_A.weight"):
            assert value.shape[0] == layout[key.split(".lora_")[0].removeprefix("base_model.model.")][0]
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(tiny4), tmp_path / "adapter").eval()
    assert _peft_layout(peft_model) == layout
    theirs, ours = hf_logits(peft_model, TOKENS), np.asarray(model(jnp.asarray(TOKENS)))
    assert np.abs(theirs - hf_logits(load_hf_model(tiny4), TOKENS)).max() > 1e-3  # the adapter matters
    assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["regex-some-layers", "layers_pattern", "rank-alpha-patterns", "exclude-names"])
def test_pefts_per_layer_adapters_load_here_and_round_trip(tiny4, tmp_path, name):
    peft_config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **SELECTIONS[name])
    _peft_round_trip(tiny4, tmp_path, peft_config)


def test_adapter_files_that_do_not_fit_their_config_are_refused(tiny4, tmp_path):
    config = LoraConfig(**SELECTIONS["layers_to_transform"])
    save_peft_adapter(_ours_with_adapter(tiny4, config), tmp_path / "a", config)
    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    # a layer the config does not adapt
    extra = dict(tensors) | {k.replace("layers.0.", "layers.1."): v for k, v in tensors.items() if "layers.0." in k}
    save_file(extra, tmp_path / "a" / ADAPTER_WEIGHTS)
    fresh, _ = load_pretrained(tiny4, quantization=None, dtype=jnp.float32)
    with pytest.raises(PeftFormatError, match=r"holds model\.layers\.1\.self_attn\.q_proj, which its config"):
        load_peft_adapter(fresh, tmp_path / "a")
    # a layer it adapts, missing
    missing = {k: v for k, v in tensors.items() if "layers.2." not in k}
    save_file(missing, tmp_path / "a" / ADAPTER_WEIGHTS)
    fresh, _ = load_pretrained(tiny4, quantization=None, dtype=jnp.float32)
    with pytest.raises(PeftFormatError, match=r"no tensors for model\.layers\.2\.self_attn\.(q|v)_proj, which its"):
        load_peft_adapter(fresh, tmp_path / "a")
    # an adapter saved with another config than the one its adapters were made with
    with pytest.raises(ValueError, match="the model's adapters are not the ones its config selects"):
        save_peft_adapter(_ours_with_adapter(tiny4, config), tmp_path / "b", LoraConfig(target_modules=("q_proj",)))


def test_bfloat16_adapters_load(tiny4, tmp_path):
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(
        load_hf_model(tiny4), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, target_modules=["q_proj"])
    )
    peft_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, _ = load_pretrained(tiny4, quantization=None, dtype=jnp.float32)
    load_peft_adapter(model, tmp_path / "bf16")
    a = peft_model.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.model.layers.self_attn.q_proj.lora.lora_A[...][1]), a)


@pytest.mark.parametrize("quant", [None, QuantConfig()], ids=["dense", "nf4"])
def test_merged_per_layer_adapters_give_our_unmerged_logits(tiny4, tmp_path, quant):
    # DoRA magnitudes of the layers without an adapter are changed too (as weight decay would): never merged in
    config = LoraConfig(**SELECTIONS["rank-alpha-patterns"], use_dora=True)
    model = _ours_with_adapter(tiny4, config, quant=quant)
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32)
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert_close(hf_logits(load_hf_model(tmp_path / "merged"), TOKENS), ours)


def test_a_cut_abstract_model_keeps_the_adapter_layout_of_the_whole(tiny4):
    """The memory planner compiles models cut to their first layers: a selection naming a later layer must still
    give the cut layers their (padded) adapters, as the whole model holds them."""
    from qlora_jax.train.build import abstract_model
    from qlora_jax.train.config import DataSection, ModelSection, TrainConfig

    lora = LoraConfig(target_modules=r"model\.layers\.3\.self_attn\.q_proj", rank_pattern={"q_proj": 16})
    config = TrainConfig(
        model=ModelSection(path=str(tiny4), quant="none", dtype="float32"), data=DataSection(train="t.jsonl"), lora=lora
    )
    whole = abstract_model(config).model.layers.self_attn.q_proj.lora
    assert whole.ranks == (0, 0, 0, 16) and whole.lora_A.get_value().shape == (LAYERS, 16, 64)
    cut = abstract_model(config, num_layers=1).model.layers.self_attn.q_proj.lora
    assert cut.lora_A.get_value().shape == (1, 16, 64) and cut.lora_B.get_value().shape == (1, 64, 16)
