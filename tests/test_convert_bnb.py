"""bitsandbytes 4-bit checkpoints: what transformers saves we read, what we write transformers loads."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.cli import main as cli_main
from qlora_jax.convert import bnb as bnb_format
from qlora_jax.quant import dequantize, quantize
from tests.families import family_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
from safetensors.numpy import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.oracle

LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _bnb_config(quant_type: str, double_quant: bool):
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama saved in float32, with a row length (in_features) that is not a multiple of 64."""
    path = tmp_path_factory.mktemp("tiny_llama")
    fields = family_config("llama", hidden_size=80, intermediate_size=144, head_dim=20)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load_4bit(path, quant_type="nf4", double_quant=True):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=_bnb_config(quant_type, double_quant), device_map="cpu"
    )


def _logits(model, seed=0):
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False), ("fp4", True)])
def test_read_transformers_checkpoint_and_write_it_back(tiny_llama, tmp_path, quant_type, double_quant):
    import bitsandbytes.functional as F

    model = _load_4bit(tiny_llama, quant_type, double_quant)
    model.save_pretrained(tmp_path / "bnb")
    tensors = load_file(tmp_path / "bnb" / "model.safetensors")

    quantized, rest = bnb_format.split_state_dict(tensors)
    expected = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in LINEARS}
    assert set(quantized) == expected
    assert all(k.startswith(("lm_head", "model.embed_tokens", "model.norm")) or "layernorm" in k for k in rest)

    for key, qt in quantized.items():
        assert (qt.quant_type, qt.blocksize, qt.double_quant) == (quant_type, 64, double_quant)
        module = model.get_submodule(key.removesuffix(".weight"))
        reference = F.dequantize_4bit(module.weight.data, module.weight.quant_state).numpy()
        np.testing.assert_array_equal(np.asarray(dequantize(qt)), reference)

    # Written back, every tensor is the same, byte for byte, and transformers computes the same logits.
    rewritten = bnb_format.merge_state_dict(quantized, rest)
    assert rewritten.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(rewritten[key], value, err_msg=key)
    out = tmp_path / "ours"
    out.mkdir()
    shutil.copy(tmp_path / "bnb" / "config.json", out / "config.json")
    save_file(rewritten, out / "model.safetensors", metadata={"format": "pt"})
    np.testing.assert_array_equal(
        _logits(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")), _logits(model)
    )


def test_checkpoint_we_quantize_loads_in_transformers(tiny_llama, tmp_path):
    """Quantized by us from the float32 weights, written with a quantization_config, loaded by transformers."""
    reference_model = _load_4bit(tiny_llama)
    reference_model.save_pretrained(tmp_path / "bnb")
    reference = load_file(tmp_path / "bnb" / "model.safetensors")

    float_weights = load_file(tiny_llama / "model.safetensors")
    quantized, rest = {}, {}
    for key, value in float_weights.items():
        if any(f".{name}.weight" in key for name in LINEARS):
            quantized[key] = quantize(value)
        else:
            rest[key] = value
    out = tmp_path / "ours"
    out.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = bnb_format.quantization_config(compute_dtype="float32")
    (out / "config.json").write_text(json.dumps(config))
    save_file(bnb_format.merge_state_dict(quantized, rest), out / "model.safetensors", metadata={"format": "pt"})

    for key, qt in quantized.items():
        np.testing.assert_array_equal(np.asarray(qt.packed), reference[key].reshape(-1), err_msg=key)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(ours.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # The double-quant offsets may differ from torch's mean in the last bit, nothing else does.
    np.testing.assert_allclose(_logits(ours), _logits(reference_model), rtol=1e-4, atol=1e-5)


# The storage dtypes BitsAndBytesConfig accepts (and config.json can name): bitsandbytes reinterprets the packed
# bytes as this dtype (FSDP-QLoRA stores them in the model's float dtype, so that FSDP can flatten them with it).
QUANT_STORAGES = ("uint8", "int8", "bfloat16", "float16", "float32", "float64")


@pytest.mark.parametrize("storage", QUANT_STORAGES)
def test_quant_storage_dtypes_load_as_stored(tiny_llama, tmp_path, storage):
    """A checkpoint transformers + bitsandbytes saved with `bnb_4bit_quant_storage=<storage>`: its packed codes are
    read as bytes (the reinterpretation bitsandbytes makes), so no NaN / Inf bit pattern in a float storage is taken
    for a value; the logits are transformers + bitsandbytes' own; saved again, it is uint8 (the same bytes), which
    transformers loads to the same logits."""
    from safetensors.torch import load_file as load_torch

    from qlora_jax.convert.hf import load_pretrained, save_pretrained

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )
    transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=config, device_map="cpu", dtype=torch.float32
    ).save_pretrained(tmp_path / "stored")
    stored = load_torch(tmp_path / "stored" / "model.safetensors")
    packed = {k: v for k, v in stored.items() if k.endswith("proj.weight") and not k.startswith("lm_head")}
    assert {str(v.dtype) for v in packed.values()} == {f"torch.{storage}"}
    if storage.startswith(("float", "bfloat")):  # bit patterns that are NaN or Inf as floats: not an error
        assert sum(int((~torch.isfinite(v)).sum()) for v in packed.values()) > 0
    theirs = _logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stored", device_map="cpu"))

    model, _ = load_pretrained(tmp_path / "stored", dtype=jnp.float32)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    q_proj = model.model.layers.self_attn.q_proj.packed[...]
    for layer in range(2):
        expected = packed[f"model.layers.{layer}.self_attn.q_proj.weight"].view(torch.uint8).reshape(-1).numpy()
        np.testing.assert_array_equal(np.asarray(q_proj[layer]), expected)

    save_pretrained(model, tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"]
        == "uint8"
    )
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu", dtype=torch.float32)
    np.testing.assert_allclose(_logits(again), theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def _state(tmp_path_factory=None):
    qt = quantize(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    return bnb_format.to_state_dict(qt, "layer.weight")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.pop("layer.weight.absmax"), "layer.weight.absmax: missing"),
        (lambda s: s.__setitem__("layer.weight", s["layer.weight"][:-1]), "layer.weight: expected 512 bytes"),
        (
            lambda s: s.__setitem__("layer.weight", s["layer.weight"].astype(bool)),
            "layer.weight: packed 4-bit codes stored as bool",
        ),
        (
            lambda s: s.__setitem__("layer.weight.absmax", s["layer.weight.absmax"].astype(np.float32)),
            "layer.weight.absmax: expected dtype uint8",
        ),
        (lambda s: s.__setitem__("layer.weight.quant_map", s["layer.weight.quant_map"] * 2), "quant_map: differs"),
        (
            lambda s: s.__setitem__("layer.weight.quant_state.bitsandbytes__nf4", np.frombuffer(b"{oops", np.uint8)),
            "not a valid bitsandbytes quant state",
        ),
        (lambda s: s.pop("layer.weight.quant_state.bitsandbytes__nf4"), "expected exactly one"),
        (
            lambda s: s.__setitem__(
                "layer.weight.quant_state.bitsandbytes__nf4",
                np.frombuffer(
                    b'{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [16, 64]}', np.uint8
                ),
            ),
            "unsupported blocksize 48",
        ),
    ],
)
def test_malformed_entries_name_the_key(mutate, match):
    state = _state()
    mutate(state)
    with pytest.raises(bnb_format.BnbFormatError, match=match):
        bnb_format.from_state_dict(state, "layer.weight")


def test_int4_cannot_be_written():
    with pytest.raises(ValueError, match="bitsandbytes cannot store quant_type 'int4'"):
        bnb_format.to_state_dict(quantize(np.ones(64, np.float32), quant_type="int4"), "w")


def test_stacked_tensor_cannot_be_written():
    import jax

    stacked = jax.vmap(quantize)(jnp.ones((2, 8, 64)))
    with pytest.raises(ValueError, match="stacked"):
        bnb_format.to_state_dict(stacked, "w")


def test_cli_inspect(tiny_llama, tmp_path, capsys):
    _load_4bit(tiny_llama).save_pretrained(tmp_path / "bnb")
    assert cli_main(["inspect", str(tmp_path / "bnb" / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "14 4-bit weights" in out and "model.layers.1.mlp.down_proj.weight" in out and "bits/param" in out

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SystemExit, match="corrupt.safetensors: not a readable safetensors file"):
        cli_main(["inspect", str(corrupt)])
    with pytest.raises(SystemExit, match="no such file"):
        cli_main(["inspect", str(tmp_path / "missing.safetensors")])


# Unsloth's "dynamic" 4-bit checkpoints keep some layers' modules in 16 bits by naming them per layer.
SKIPPED = ["lm_head", "model.layers.0.mlp", "model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize(
    "pattern",
    [
        "lm_head",
        "o_proj",
        "model.layers.1",
        "model.layers.1.mlp",
        "mlp.gate",
        "layers.1.self_attn.q_proj",
        "model.layers.[01].mlp.down_proj",
        r"model\.layers\.1\..*_proj",
        "proj",
        "model.layers.1.mlp.up",
    ],
)
def test_skip_modules_match_as_transformers_matches(pattern):
    from transformers.quantizers.quantizers_utils import should_convert_module

    from qlora_jax.quant import QuantConfig

    quant = QuantConfig(skip_modules=(pattern,))
    modules = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    names = ["lm_head"] + [f"model.layers.{i}.{m}" for i in (1, 11) for m in modules]
    for name in names:
        assert quant.skips(name) == (not should_convert_module(name, [pattern])), name


def test_skip_modules_must_be_names_or_regexes():
    from qlora_jax.quant import QuantConfig

    with pytest.raises(ValueError, match=r"skip_modules: 'model.layers.\(' is not a module name or regular expression"):
        QuantConfig(skip_modules=("model.layers.(",))
    with pytest.raises(ValueError, match="must be a list of module names"):
        QuantConfig(skip_modules="lm_head")


@pytest.fixture(scope="module")
def unsloth_style(tiny_llama, tmp_path_factory):
    """The tiny Llama quantized by transformers + bitsandbytes with per-layer skips, saved; and its logits."""
    directory = tmp_path_factory.mktemp("dynamic_4bit")
    config = _bnb_config("nf4", True)
    config.llm_int8_skip_modules = list(SKIPPED)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, device_map="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"  # kept in 16 bits by transformers
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"  # layer 1's is 4-bit
    model.save_pretrained(directory)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    return directory, _logits(reloaded)


def test_dynamic_4bit_checkpoint_keeps_its_16bit_layers(unsloth_style, caplog):
    """Layer 0's MLP and layer 1's o_proj load as stored (16 bits), every other linear as its 4-bit bytes: the
    stacked modules with a skipped layer are held in 16 bits for all layers (the 4-bit layers dequantized exactly),
    and the logits are transformers + bitsandbytes' own."""
    from safetensors.torch import load_file as load_torch

    from qlora_jax.convert.hf import load_pretrained

    directory, theirs = unsloth_style
    with caplog.at_level("WARNING", logger="qlora_jax.convert.hf"):
        model, _ = load_pretrained(directory, dtype=jnp.float32)
    assert model.quant.skip_modules == tuple(SKIPPED)
    layers = model.model.layers
    assert [m.is_quantized for m in (layers.mlp.up_proj, layers.self_attn.o_proj, layers.self_attn.q_proj)] == [
        False,
        False,
        True,
    ]
    stored = load_torch(directory / "model.safetensors")
    np.testing.assert_array_equal(
        np.asarray(layers.mlp.up_proj.weight[...][0]), stored["model.layers.0.mlp.up_proj.weight"].numpy()
    )
    np.testing.assert_array_equal(
        np.asarray(layers.self_attn.o_proj.weight[...][1]), stored["model.layers.1.self_attn.o_proj.weight"].numpy()
    )
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "model.layers.mlp.down_proj: skip_modules keeps layer 0 unquantized" in m and "kB more" in m for m in messages
    ), messages
    assert any("model.layers.self_attn.o_proj: skip_modules keeps layer 1" in m for m in messages), messages


def test_dynamic_4bit_quantized_from_16_bits_like_transformers(tiny_llama, unsloth_style):
    """The same skip list given to our loader on the 16-bit checkpoint: the same modules stay in 16 bits."""
    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.quant import QuantConfig

    _, theirs = unsloth_style
    model, _ = load_pretrained(tiny_llama, quantization=QuantConfig(skip_modules=tuple(SKIPPED)), dtype=jnp.float32)
    assert not model.model.layers.mlp.gate_proj.is_quantized and model.model.layers.self_attn.k_proj.is_quantized
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0)).numpy()
    # the double-quantization offsets may differ from torch's mean in the last bit
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_dynamic_4bit_exports_keep_the_per_layer_storage(unsloth_style, tmp_path):
    """save_pretrained and a 4-bit merge write each layer as the skip list says (16 bits for layer 0's MLP only),
    which transformers loads."""
    from qlora_jax.convert.hf import load_pretrained, save_pretrained
    from qlora_jax.convert.merge import merge_and_save

    directory, theirs = unsloth_style
    model, _ = load_pretrained(directory, dtype=jnp.float32)
    save_pretrained(model, tmp_path / "saved")
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32, quant=model.quant)
    for out in ("saved", "merged"):
        tensors = load_file(tmp_path / out / "model.safetensors")
        quantized = set(bnb_format.quantized_weight_prefixes(tensors))
        assert "model.layers.0.mlp.up_proj.weight" not in quantized and "lm_head.weight" not in quantized, out
        assert {"model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight"} <= quantized, out
        assert "model.layers.1.self_attn.o_proj.weight" not in quantized, out
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["quantization_config"]["llm_int8_skip_modules"] == SKIPPED
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, device_map="cpu")
        # the 4-bit layers held in 16 bits are quantized again from their dequantized values: the same codes,
        # double-quantization statistics of their own
        np.testing.assert_allclose(_logits(hf), theirs, rtol=0, atol=2e-3 * np.abs(theirs).max())


def test_storage_that_contradicts_the_skip_list_is_refused(unsloth_style, tmp_path):
    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.convert.safetensors_io import CheckpointError

    directory, _ = unsloth_style
    shutil.copytree(directory, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "model.layers.1.self_attn.o_proj"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    message = r"model.layers.0.mlp.down_proj.weight is stored in 16 bits, but .*llm_int8_skip_modules .* does not"
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / "m")


@pytest.mark.slow
def test_memory_plan_counts_the_16_bit_stacks(tiny_llama, unsloth_style):
    """A run on the dynamic checkpoint is planned as it loads: the stacked modules with a skipped layer (the three
    MLP projections and o_proj, both layers each) count as 16-bit weights, in the whole model and in the planner's
    shallow probes alike."""
    from qlora_jax.train.build import abstract_model, quant_config
    from qlora_jax.train.config import config_from_dict
    from qlora_jax.train.plan import plan_memory

    def config(path):
        return config_from_dict(
            {
                "model": {"path": str(path), "quant": "nf4", "dtype": "bfloat16"},
                "data": {"train": "unused.jsonl", "max_length": 32},
                "lora": {"r": 4, "target_modules": "all-linear"},
                "train": {"batch_size": 1, "remat": "full", "loss_chunk_size": 32},
            }
        )

    directory, _ = unsloth_style
    assert quant_config(config(directory)).skip_modules == tuple(SKIPPED)
    for num_layers in (None, 1):
        layers = abstract_model(config(directory), num_layers=num_layers).model.layers
        assert not layers.mlp.down_proj.is_quantized and not layers.self_attn.o_proj.is_quantized
        assert layers.self_attn.q_proj.is_quantized
    dynamic, plain = plan_memory(config(directory)), plan_memory(config(tiny_llama))
    hidden, inner, layers = 80, 144, 2
    assert dynamic.dense_weights - plain.dense_weights == 2 * layers * (3 * hidden * inner + hidden * hidden)
    assert dynamic.quantized_weights < plain.quantized_weights
