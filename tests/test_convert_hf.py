"""transformers checkpoints in and out: save_pretrained loads in transformers, sharding, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.hf import CheckpointError, load_pretrained, save_pretrained
from qlora_jax.convert.safetensors_io import write_sharded
from qlora_jax.models import UnsupportedModelError
from qlora_jax.quant import QuantConfig
from tests.models_util import make_tiny_model, torch, transformers

pytestmark = pytest.mark.oracle
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 7))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    make_tiny_model("qwen2", directory)
    return directory


def _hf_logits(directory, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def test_dense_save_loads_in_transformers(tiny_dir, tmp_path):
    model, _ = load_pretrained(tiny_dir, quantization=None, dtype=jnp.float32)
    save_pretrained(model, tmp_path / "out")
    np.testing.assert_allclose(_hf_logits(tmp_path / "out"), np.asarray(model(jnp.asarray(TOKENS))), atol=2e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "quantization_config" not in config


def test_nf4_save_loads_in_transformers_bitsandbytes(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    quant = QuantConfig(blocksize=32)
    model, _ = load_pretrained(tiny_dir, quantization=quant, dtype=jnp.float32)
    save_pretrained(model, tmp_path / "out")
    theirs = _hf_logits(tmp_path / "out")
    np.testing.assert_allclose(theirs, np.asarray(model(jnp.asarray(TOKENS))), atol=2e-5)
    again, _ = load_pretrained(tmp_path / "out", dtype=jnp.float32)  # read back as stored
    assert again.quant.blocksize == 32 and again.quant.skip_modules == ("lm_head",)  # as its config.json lists
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))
    dense, _ = load_pretrained(tmp_path / "out", quantization=None, dtype=jnp.float32)  # dequantized
    assert not dense.model.layers.mlp.up_proj.is_quantized
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(TOKENS))), theirs, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_exports_write_the_models_compute_dtype(tiny_dir, tmp_path, dtype):
    """bnb_4bit_compute_dtype is what the model computes in (its dtype): there is no second setting to disagree."""
    from qlora_jax.convert.merge import merge_and_save

    model, _ = load_pretrained(tiny_dir, dtype=dtype)
    save_pretrained(model, tmp_path / "out")
    merge_and_save(model, tmp_path / "merged", dtype=dtype, quant=QuantConfig())
    for directory in ("out", "merged"):
        written = json.loads((tmp_path / directory / "config.json").read_text())["quantization_config"]
        assert written["bnb_4bit_compute_dtype"] == jnp.dtype(dtype).name
    assert "compute_dtype" not in {f.name for f in dataclasses.fields(QuantConfig)}


def test_sharded_checkpoints_round_trip(tiny_dir, tmp_path):
    model, _ = load_pretrained(tiny_dir, quantization=None, dtype=jnp.float32)
    files = save_pretrained(model, tmp_path / "out", max_shard_size="30KB")
    assert (tmp_path / "out" / "model.safetensors.index.json") in files
    assert len([f for f in files if f.name.startswith("model-")]) > 2
    again, _ = load_pretrained(tmp_path / "out", quantization=None, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))
    np.testing.assert_allclose(_hf_logits(tmp_path / "out"), np.asarray(model(jnp.asarray(TOKENS))), atol=2e-5)
    # Saving unsharded over it replaces the shards with one file.
    save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]


def test_interrupted_write_keeps_the_old_checkpoint(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def tensors():
        yield "a", np.zeros(3, np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_sharded(tmp_path / "ckpt", tensors())
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert not list((tmp_path / "ckpt").glob(".writing-*"))


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config))


@pytest.fixture
def copy(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    return tmp_path / "m"


def test_unknown_model_type_lists_the_supported_ones(copy):
    _edit_config(copy, model_type="gpt2")
    with pytest.raises(
        UnsupportedModelError, match=r"config.json: model_type 'gpt2' is not supported; supported: llama"
    ):
        load_pretrained(copy)


def test_unsupported_rope_and_missing_fields(copy):
    _edit_config(copy, rope_scaling={"rope_type": "mrope", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(UnsupportedModelError, match=r"rope_scaling\.rope_type 'mrope' is not supported"):
        load_pretrained(copy)
    _edit_config(copy, rope_scaling=None, hidden_size=None)
    with pytest.raises(ValueError, match="required field 'hidden_size' is missing"):
        load_pretrained(copy)


def test_tensor_problems_name_the_file_and_tensor(copy):
    from safetensors.numpy import load_file, save_file

    path = copy / "model.safetensors"
    original = load_file(path)

    def write(tensors):
        save_file(tensors, path, metadata={"format": "pt"})

    write({k: v for k, v in original.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(copy)
    write(original | {"model.layers.0.mlp.up_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.up_proj.weight has shape"):
        load_pretrained(copy)
    write(original | {"model.layers.7.mlp.up_proj.weight": original["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.7.mlp.up_proj.weight"):
        load_pretrained(copy)
    write(original | {"model.norm.weight": np.zeros(64, np.int32)})
    with pytest.raises(CheckpointError, match="model.norm.weight has unsupported dtype int32"):
        load_pretrained(copy)
    write(original)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(copy)


def test_missing_shard_and_files(copy, tmp_path):
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard listed in"):
        load_pretrained(copy)
    with pytest.raises(CheckpointError, match="not a model directory or a .gguf file"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
