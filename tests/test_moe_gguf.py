"""A mixture of experts in GGUF (llama.cpp's names: blk.N.ffn_gate_inp, ffn_{gate,up,down}_exps): Qwen3-MoE
(`qwen3moe`) written and read back, and transformers' GGUF loader computes our logits from our file; Mixtral (a
llama with experts to llama.cpp) written and read back (transformers' GGUF loader reads llama files as dense
Llamas, so it is no oracle there). What llama.cpp cannot compute is refused."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.convert.gguf_export import save_gguf
from qlora_jax.convert.hf import load_pretrained
from qlora_jax.models.config_files import GGUFError
from tests.helpers import random_tokens
from tests.test_moe_models import make_tiny_moe

pytestmark = pytest.mark.oracle
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_qwen3_moe_gguf_round_trip_and_transformers_reads_it(tmp_path):
    # transformers' GGUF config for qwen3moe skips expert_feed_forward_length: its default (768) must be ours
    make_tiny_moe("qwen3_moe", tmp_path / "m", moe_intermediate_size=768)
    model, _ = load_pretrained(tmp_path / "m", quantization=None, dtype=jnp.float32)
    path = save_gguf(model, tmp_path / "q.gguf", tensor_type="f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {
        "blk.1.ffn_gate_inp.weight",
        "blk.1.ffn_gate_exps.weight",
        "blk.1.ffn_up_exps.weight",
        "blk.1.ffn_down_exps.weight",
    } <= names
    again, config = load_pretrained(path, quantization=None, dtype=jnp.float32)
    assert config.model_type == "qwen3_moe" and config.moe == model.config.moe
    tokens = jnp.asarray(random_tokens())
    ours = np.asarray(model(tokens))
    np.testing.assert_array_equal(np.asarray(again(tokens)), ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(random_tokens())).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-5 * np.abs(ours).max(), rtol=0)
    nf4, _ = load_pretrained(path, dtype=jnp.float32)  # and NF4 experts from the file
    assert nf4.model.layers.mlp.experts.down_proj.is_quantized


def test_mixtral_gguf_round_trip(tmp_path):
    make_tiny_moe("mixtral", tmp_path / "m")
    model, _ = load_pretrained(tmp_path / "m", quantization=None, dtype=jnp.float32)
    path = save_gguf(model, tmp_path / "x.gguf", tensor_type="f32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.expert_count"].contents() == 4
    again, config = load_pretrained(path, quantization=None, dtype=jnp.float32)
    assert config.model_type == "mixtral" and config.moe == model.config.moe
    tokens = jnp.asarray(random_tokens())
    np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(model(tokens)), atol=1e-6, rtol=0)


def test_what_llama_cpp_cannot_compute_is_refused(tmp_path):
    make_tiny_moe("qwen3_moe", tmp_path / "m", norm_topk_prob=False)
    model, _ = load_pretrained(tmp_path / "m", quantization=None, dtype=jnp.float32)
    with pytest.raises(GGUFError, match="always renormalizes the top-k routing weights"):
        save_gguf(model, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()
