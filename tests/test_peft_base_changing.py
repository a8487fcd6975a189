"""PEFT adapters whose initialization changed the base weights (PiSSA, OLoRA, CorDA, LoRA-GA), saved by PEFT
without conversion: PiSSA and OLoRA are rebuilt from the base as PEFT rebuilds them when it loads them, and hold the
logits PEFT computes; the others are refused naming the field and the conversion to run. Adapters whose base stays
as it was (EVA, LoftQ, orthogonal) and PEFT-converted ones load as plain LoRA."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.convert.merge import merge_and_save
from qlora_jax.convert.peft import (
    ADAPTER_CONFIG,
    PeftFormatError,
    load_peft_adapter,
    read_adapter_config_dict,
    save_peft_adapter,
)
from qlora_jax.quant import QuantConfig
from tests.helpers import assert_close
from tests.models_util import hf_logits, load_hf_model, make_tiny_model, torch

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 9))


@pytest.fixture(scope="module", params=["llama", "phi3"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", directory)
    return directory


def _ours(directory, quantization=None):
    return load_pretrained(directory, quantization=quantization, dtype=jnp.float32)[0]


def _trained_peft_adapter(base_dir, directory, **config):
    """A PEFT adapter made with `config` (its initialization run by PEFT), then 'trained' (A and B moved), saved as
    PEFT saves it; and the initial adapter saved beside it, as PEFT's conversion recipe asks. Returns the logits of
    the trained PEFT model."""
    fields = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") | config
    peft_model = peft.get_peft_model(load_hf_model(base_dir), peft.LoraConfig(**fields)).eval()
    peft_model.peft_config["default"].init_lora_weights = True  # the initial adapter as plain LoRA (PEFT's recipe)
    peft_model.save_pretrained(directory / "initial")
    peft_model.peft_config["default"].init_lora_weights = fields.get("init_lora_weights", True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(directory / "adapter")
    trained = hf_logits(peft_model, TOKENS)
    if not (fields.get("use_rslora") and (fields.get("rank_pattern") or fields.get("alpha_pattern"))):  # PEFT: no
        peft_model.save_pretrained(
            directory / "converted", path_initial_model_for_weight_conversion=directory / "initial"
        )
    return trained


CASES = {
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "pissa-rslora-patterns": dict(
        init_lora_weights="pissa", use_rslora=True, target_modules=["q_proj", "down_proj"], rank_pattern={"q_proj": 2}
    ),
    "olora-alpha-pattern": dict(
        init_lora_weights="olora", target_modules=["v_proj", "o_proj", "up_proj"], alpha_pattern={"up_proj": 3.0}
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_base_changing_adapter_computes_pefts_logits(tiny, tmp_path, case):
    """PEFT loading the adapter onto the original base redoes the initialization (the SVD or QR of each weight)
    and so reproduces the trained model; here the adapter becomes the plain LoRA PEFT's conversion writes (rank 2r,
    [A; A0], [B, -B0]) on the unchanged base, with the same logits, in PEFT (which loads it back) and merged."""
    if "pattern" in case and tiny.name.startswith("phi3"):
        pytest.skip("the patterns name llama's projections; phi3 fuses them")
    trained = _trained_peft_adapter(tiny, tmp_path, **CASES[case])
    reloaded = hf_logits(peft.PeftModel.from_pretrained(load_hf_model(tiny), tmp_path / "adapter").eval(), TOKENS)
    assert_close(reloaded, trained, 1e-5)  # PEFT rebuilds the changed base on load
    assert np.abs(trained - hf_logits(load_hf_model(tiny), TOKENS)).max() > 1e-2

    model = _ours(tiny)
    config = load_peft_adapter(model, tmp_path / "adapter")
    raw = read_adapter_config_dict(tmp_path / "adapter")
    assert config.r == 2 * raw["r"] and not model.model.layers.self_attn.o_proj.is_quantized
    assert_close(model(jnp.asarray(TOKENS)), trained)

    # written back (with its template, as a round trip does): the converted adapter, which PEFT applies unchanged
    save_peft_adapter(model, tmp_path / "ours", config, template=raw)
    written = read_adapter_config_dict(tmp_path / "ours")
    assert written["init_lora_weights"] is True and written["r"] == 2 * raw["r"]
    assert_close(
        hf_logits(peft.PeftModel.from_pretrained(load_hf_model(tiny), tmp_path / "ours").eval(), TOKENS), trained
    )
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32)
    assert_close(hf_logits(load_hf_model(tmp_path / "merged"), TOKENS), trained)


def test_pefts_converted_adapter_loads_as_plain_lora(tiny, tmp_path):
    trained = _trained_peft_adapter(tiny, tmp_path, init_lora_weights="olora")
    converted = read_adapter_config_dict(tmp_path / "converted")
    assert converted["init_lora_weights"] is True and converted["r"] == 8
    model = _ours(tiny)
    load_peft_adapter(model, tmp_path / "converted")
    assert_close(model(jnp.asarray(TOKENS)), trained)


@pytest.mark.parametrize("init", ["eva", "loftq", "orthogonal", "gaussian", False])
def test_inits_that_leave_the_base_load_as_plain_lora(llama, tmp_path, init):
    """EVA, LoftQ (on the base it was trained with), orthogonal and gaussian adapters are plain LoRA once trained."""
    _trained_peft_adapter(llama, tmp_path)
    plain = _ours(llama)
    load_peft_adapter(plain, tmp_path / "adapter")
    config = read_adapter_config_dict(tmp_path / "adapter") | {"init_lora_weights": init}
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(config))
    model = _ours(llama)
    load_peft_adapter(model, tmp_path / "adapter")
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))), np.asarray(plain(jnp.asarray(TOKENS))))
    if init == "eva":  # PEFT loads it as it is, too
        assert_close(
            model(jnp.asarray(TOKENS)),
            hf_logits(peft.PeftModel.from_pretrained(load_hf_model(llama), tmp_path / "adapter"), TOKENS),
        )


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("pissa_niter_4", r"init_lora_weights='pissa_niter_4': PEFT changed the base weights .*a random sketch"),
        ("corda", r"init_lora_weights='corda': PEFT changed the base weights"),
        ("lora_ga", r"init_lora_weights='lora_ga': PEFT changed the base weights"),
        ("kaiming", r"init_lora_weights='kaiming' is not an initialization this package knows"),
    ],
)
def test_adapters_whose_base_cannot_be_rebuilt_are_refused(llama, tmp_path, init, message):
    _trained_peft_adapter(llama, tmp_path)
    config = read_adapter_config_dict(tmp_path / "adapter") | {"init_lora_weights": init}
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(config))
    model = _ours(llama)
    with pytest.raises(PeftFormatError, match=message) as error:
        load_peft_adapter(model, tmp_path / "adapter")
    if init != "kaiming":
        assert "path_initial_model_for_weight_conversion" in str(error.value)
    assert model.model.layers.self_attn.o_proj.lora is None  # nothing changed


def test_pissa_on_a_4bit_base_and_with_dora_are_refused(llama, tmp_path):
    _trained_peft_adapter(llama, tmp_path, init_lora_weights="pissa")
    with pytest.raises(PeftFormatError, match=r"init_lora_weights='pissa' on a 4-bit base .*quantization=None"):
        load_peft_adapter(_ours(llama, QuantConfig()), tmp_path / "adapter")
    shutil.copytree(tmp_path / "adapter", tmp_path / "dora")
    config = read_adapter_config_dict(tmp_path / "dora") | {"use_dora": True}
    (tmp_path / "dora" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(PeftFormatError, match=r"init_lora_weights='pissa' with use_dora is not supported"):
        load_peft_adapter(_ours(llama), tmp_path / "dora")
