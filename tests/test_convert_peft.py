"""Adapters to and from PEFT, and merged exports, verified in transformers and PEFT."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.quant import QuantConfig
from tests.models_util import make_tiny_model, torch, transformers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 9))


@pytest.fixture(scope="module", params=["llama", "phi3"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, directory)
    return directory


def _hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


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
    peft_model = peft.PeftModel.from_pretrained(_hf(tiny), tmp_path / "adapter").eval()
    theirs = _logits(peft_model)
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert np.abs(theirs - _logits(_hf(tiny))).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max())


def test_peft_to_ours_to_peft_round_trip_changes_nothing(tiny, tmp_path):
    hf_model = _hf(tiny)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                             task_type="CAUSAL_LM", use_rslora=True)  # fmt: skip
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf_model, config).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    theirs = _logits(peft_model)

    model, _ = load_pretrained(tiny, quantization=None, dtype=jnp.float32)
    ours_config = load_peft_adapter(model, tmp_path / "theirs")
    assert ours_config.r == 4 and ours_config.use_rslora
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), theirs, atol=2e-5 * np.abs(theirs).max())

    template = read_adapter_config_dict(tmp_path / "theirs")
    save_peft_adapter(model, tmp_path / "again", ours_config, template=template)
    assert read_adapter_config_dict(tmp_path / "again") == template
    from safetensors.numpy import load_file

    before, after = load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS), load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


@pytest.mark.parametrize("quant", [None, QuantConfig()], ids=["dense", "nf4"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_checkpoint_gives_our_unmerged_logits(tiny, tmp_path, quant, dora):
    lora_config = LoraConfig(r=4, lora_alpha=8, use_dora=dora)
    model = _ours_with_adapter(tiny, lora_config, quant=quant)
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = _hf(tmp_path / "merged")
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(_logits(merged), ours, atol=2e-5 * np.abs(ours).max())


def test_merged_and_requantized_loads_in_bitsandbytes(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = _ours_with_adapter(tiny, LoraConfig(r=4))
    merge_and_save(model, tmp_path / "merged4", dtype=jnp.float32, quant=QuantConfig())
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged4", device_map="cpu").eval()
    assert type(hf4.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ours4, _ = load_pretrained(tmp_path / "merged4", dtype=jnp.float32)
    ours = np.asarray(ours4(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(_logits(hf4), ours, atol=2e-5 * np.abs(ours).max())
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
