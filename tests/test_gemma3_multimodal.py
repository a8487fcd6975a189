"""Gemma 3's image-text checkpoints (Gemma3ForConditionalGeneration, how gemma-3-it is published): the text decoder
loads here; adapters are keyed for the model they were trained on, both ways (ours apply in PEFT on the image-text
model, PEFT's trained on it load here); a merge writes the image-text model back with its vision tower and config;
its bitsandbytes 4-bit checkpoints load as stored. Checked against transformers 5's own layout of a tiny random
model built here."""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.convert.merge import merge_and_save
from qlora_jax.convert.peft import ADAPTER_WEIGHTS, load_peft_adapter, read_adapter_config_dict, save_peft_adapter
from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.quant import QuantConfig
from tests.families import GEMMA3_TEXT, GEMMA3_VISION
from tests.helpers import assert_close
from tests.models_util import hf_logits, torch, transformers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle
TOKENS = np.random.default_rng(0).integers(1, 300, (2, 9))


@pytest.fixture(scope="module")
def image_text(tmp_path_factory):
    """A random Gemma3ForConditionalGeneration saved by transformers (its norms randomized too)."""
    directory = tmp_path_factory.mktemp("gemma3_image_text")
    config = transformers.Gemma3Config(text_config=GEMMA3_TEXT, vision_config=GEMMA3_VISION, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return directory


def _hf(directory):
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


def _ours_with_adapter(directory, lora_config, quantization=None):
    model, config = load_pretrained(directory, quantization=quantization, dtype=jnp.float32)
    assert config.multimodal_config is not None and config.text_model_path == "model.language_model"
    apply_lora(model, lora_config, rngs=nnx.Rngs(3))
    for _, module in nnx.iter_graph(model):
        if getattr(module, "lora", None) is not None:
            b = module.lora.lora_B
            b.set_value(np.random.default_rng(3).standard_normal(b[...].shape).astype(np.float32) * 0.05)
    return model


def test_checkpoint_layout_is_transformers(image_text):
    """What this module relies on: transformers 5 saves the text decoder as `language_model.model.*` beside
    `vision_tower.*` and `multi_modal_projector.*`, and names its modules `model.language_model.*` at run time."""
    keys = load_file(image_text / "model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "language_model.model.layers.1.mlp.down_proj.weight" in keys
    names = {name for name, _ in _hf(image_text).named_modules()}
    assert {
        "model.language_model.layers.1.self_attn.q_proj",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj",
        "lm_head",
    } <= names


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), exclude_modules=("layers.0.self_attn.v_proj",)
        ),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.1\.mlp\.\w+_proj", rank_pattern={"up_proj": 2}
        ),
    ],
    ids=["all-linear", "names-exclude", "regex-rank-pattern"],
)
def test_our_adapter_applies_in_peft_on_the_image_text_model(image_text, tmp_path, lora_config):
    """Keys and config name the image-text model's modules; PEFT adapts its text decoder only (not the vision
    tower's q/v projections a list of names would also reach), every key is used, the text logits are ours."""
    model = _ours_with_adapter(image_text, lora_config)
    save_peft_adapter(model, tmp_path / "adapter", lora_config)
    keys = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS).keys()
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    peft_model = peft.PeftModel.from_pretrained(_hf(image_text), tmp_path / "adapter").eval()
    adapted = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    assert adapted and all(".language_model." in name for name in adapted)
    assert {f"{name}.lora_A.weight" for name in adapted} == {k for k in keys if "lora_A" in k}  # every key used
    theirs = hf_logits(peft_model, TOKENS)
    assert np.abs(theirs - hf_logits(_hf(image_text), TOKENS)).max() > 1e-3
    assert_close(model(jnp.asarray(TOKENS)), theirs)


def test_pefts_adapter_trained_on_the_image_text_model_loads(image_text, tmp_path, caplog):
    """PEFT's all-linear reaches the vision tower too: those adapters are left out (with a warning: they do not
    change text outputs), the text decoder's load under their names, and a round trip keeps the config."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_hf(image_text), config).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    theirs = hf_logits(peft_model, TOKENS)
    keys = load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS).keys()
    assert any(".vision_tower." in k for k in keys)

    model, _ = load_pretrained(image_text, quantization=None, dtype=jnp.float32)
    with caplog.at_level(logging.WARNING, logger="qlora_jax.convert.peft"):
        ours_config = load_peft_adapter(model, tmp_path / "theirs")
    assert any(
        "adapter tensors of the vision tower / projector are not loaded" in r.getMessage() for r in caplog.records
    )
    assert_close(model(jnp.asarray(TOKENS)), theirs)

    template = read_adapter_config_dict(tmp_path / "theirs")
    save_peft_adapter(model, tmp_path / "again", ours_config, template=template)
    assert read_adapter_config_dict(tmp_path / "again") == template
    before, after = load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS), load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert set(after) == {k for k in before if ".language_model." in k}
    for key in after:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_merge_writes_the_image_text_model_back(image_text, tmp_path):
    """With its checkpoint as `source`: Gemma3ForConditionalGeneration, the config and vision tower as they were,
    the merged text decoder; transformers computes our text logits from it."""
    model = _ours_with_adapter(image_text, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32, source=image_text)
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    original = json.loads((image_text / "config.json").read_text())
    assert written["model_type"] == "gemma3" and written["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert written["vision_config"] == original["vision_config"]
    assert {k: v for k, v in written["text_config"].items() if k != "dtype"} == {
        k: v for k, v in original["text_config"].items() if k != "dtype"
    }
    source, merged = load_file(image_text / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert set(merged) == set(source)
    for key in source:
        if not key.startswith("language_model."):
            np.testing.assert_array_equal(merged[key], source[key], err_msg=key)
    assert_close(hf_logits(_hf(tmp_path / "merged"), TOKENS), ours)


def test_merge_without_its_checkpoint_says_it_writes_the_text_model(image_text, tmp_path, caplog):
    model = _ours_with_adapter(image_text, LoraConfig(r=4, lora_alpha=8))
    with caplog.at_level(logging.WARNING, logger="qlora_jax.convert.merge"):
        merge_and_save(model, tmp_path / "text", dtype=jnp.float32)
    assert any("writing a text-only Gemma3ForCausalLM" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "gemma3_text"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32).eval()
    assert_close(hf_logits(hf, TOKENS), np.asarray(model(jnp.asarray(TOKENS))))


def test_4bit_image_text_checkpoints_load_and_merge_as_stored(image_text, tmp_path):
    """transformers + bitsandbytes' 4-bit image-text checkpoint (quantization_config beside text_config, the vision
    tower 4-bit too) loads as stored. Merged to 4 bits, its vision tower stays as stored (a 16-bit one unquantized);
    merged to 16 bits, it is dequantized. transformers loads each."""
    pytest.importorskip("bitsandbytes")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    transformers.Gemma3ForConditionalGeneration.from_pretrained(
        image_text, quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    ).save_pretrained(tmp_path / "4bit")
    theirs = hf_logits(
        transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "4bit", device_map="cpu"), TOKENS
    )
    model, _ = load_pretrained(tmp_path / "4bit", dtype=jnp.float32)
    assert model.model.layers.mlp.up_proj.is_quantized
    assert_close(model(jnp.asarray(TOKENS)), theirs, 1e-5)

    def fc1(directory):
        hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(
            directory, device_map="cpu", dtype=torch.float32
        )
        return hf, type(hf.model.vision_tower.encoder.layers[0].mlp.fc1).__name__

    merge_and_save(model, tmp_path / "merged4", dtype=jnp.float32, quant=QuantConfig(), source=tmp_path / "4bit")
    source, merged = (
        load_file(tmp_path / "4bit" / "model.safetensors"),
        load_file(tmp_path / "merged4" / "model.safetensors"),
    )
    for key in (k for k in source if k.startswith("vision_tower.")):
        np.testing.assert_array_equal(merged[key], source[key], err_msg=key)
    hf, kind = fc1(tmp_path / "merged4")
    assert kind == "Linear4bit" and type(hf.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert_close(hf_logits(hf, TOKENS), theirs, 2e-3)  # the merged layers quantized again from their dequantized values

    merge_and_save(model, tmp_path / "merged16", dtype=jnp.float32, source=tmp_path / "4bit")
    hf, kind = fc1(tmp_path / "merged16")
    assert kind == "Linear" and "quantization_config" not in json.loads(
        (tmp_path / "merged16" / "config.json").read_text()
    )
    assert_close(hf_logits(hf, TOKENS), theirs, 1e-5)

    from16 = _ours_with_adapter(image_text, LoraConfig(r=4, lora_alpha=8), quantization=QuantConfig())
    merge_and_save(from16, tmp_path / "from16", dtype=jnp.float32, quant=QuantConfig(), source=image_text)
    hf, kind = fc1(tmp_path / "from16")
    assert kind == "Linear"  # a 16-bit vision tower stays unquantized
    assert_close(
        load_pretrained(tmp_path / "from16", dtype=jnp.float32)[0](jnp.asarray(TOKENS)), hf_logits(hf, TOKENS), 1e-5
    )
