"""GGUF export of merged models, read back three ways: by our GGUF loader (tensors and logits), by transformers'
GGUF loader (an independent reader of the names, llama's q/k permutation and the metadata), and, for the real
SmolLM2 file, by transformers' tokenizer and greedy decoding."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.convert import gguf_export
from qlora_jax.convert.gguf import read_gguf
from qlora_jax.convert.gguf_export import GGUFError, save_gguf
from qlora_jax.convert.hf import load_pretrained
from qlora_jax.convert.merge import merged_tensors
from qlora_jax.errors import OutputError
from qlora_jax.generate import chat_token_ids
from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.models import RopeConfig
from qlora_jax.quant import QuantConfig
from tests.models_util import FAMILIES, SPECIAL_TOKENS, family_config, random_hf_model, torch, transformers

pytestmark = pytest.mark.oracle
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 9))
GGUF_FIELDS = dict(rms_norm_eps=1e-6, **SPECIAL_TOKENS)  # what the export's metadata carries back
# Every family with the features its export must carry (sliding windows of 3 tokens, so 9 tokens exercise them),
# changed where llama.cpp computes something else (its Llama 3 context, Gemma's scale, 5:1 layer pattern).
CASES: dict[str, dict[str, Any]] = {
    "llama": family_config("llama", **GGUF_FIELDS, attention_bias=True, mlp_bias=True),
    "llama3-rope": family_config(
        "llama3.2",
        **GGUF_FIELDS,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=131072,
        rope_scaling=FAMILIES["llama3.2"]["rope_scaling"] | dict(original_max_position_embeddings=8192),
    ),
    "mistral": family_config(
        "mistral", **GGUF_FIELDS, sliding_window=None, rope_scaling=dict(rope_type="linear", factor=2.0)
    ),
    "qwen2": family_config("qwen2", **GGUF_FIELDS),
    "qwen3": family_config("qwen3", **GGUF_FIELDS),
    "gemma2": family_config("gemma2", **GGUF_FIELDS, query_pre_attn_scalar=16, attn_logit_softcapping=0.5),
    "gemma3": family_config("gemma3", **GGUF_FIELDS, num_hidden_layers=6, layer_types=None),  # llama.cpp's 5:1
    "phi3": family_config(
        "phi3", **GGUF_FIELDS, partial_rotary_factor=0.5, sliding_window=3, original_max_position_embeddings=64
    ),
    # rope scalings llama.cpp has keys or tables for: yarn's keys (Qwen2.5 / Qwen3 long-context configs), Phi-3's
    # longrope factors (8 rotary dimensions: 4 factors each) and attention factor
    "qwen2-yarn": family_config(
        "qwen2", **GGUF_FIELDS, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16)
    ),
    "llama-yarn-betas": family_config(
        "llama",
        **GGUF_FIELDS,
        rope_scaling=dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16.0, beta_slow=2.0
        ),
    ),
    "phi3-longrope": family_config(
        "phi3",
        **GGUF_FIELDS,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[1.0, 2.0, 4.0, 8.0]),
    ),
}
# What transformers' GGUF loader can read back: it drops llama's attention biases and reads neither head_dim
# (Qwen3, Gemma), query_pre_attn_scalar, Gemma's soft-capping values and rope settings, nor Phi-3's partial rotary
# factor and sliding window, so these keep its defaults for them.
ORACLE_CASES: dict[str, dict[str, Any]] = {
    "llama": family_config("llama", **GGUF_FIELDS),
    "qwen2": family_config("qwen2", **GGUF_FIELDS),
    "qwen3": family_config("qwen3", **GGUF_FIELDS, head_dim=128),
    "gemma2": family_config(
        "gemma2",
        **GGUF_FIELDS,
        head_dim=256,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3": family_config(
        "gemma3",
        **GGUF_FIELDS,
        num_hidden_layers=6,
        layer_types=None,
        head_dim=256,
        query_pre_attn_scalar=256,
        rope_local_base_freq=10000.0,
        rope_scaling=None,
    ),
    "phi3": family_config("phi3", **GGUF_FIELDS),
}


def tiny_model_with_adapter(directory: Path, fields: dict[str, Any], quantization: QuantConfig | None = None):
    """A random transformers model for config.json `fields` (all of them: `family_config`) saved to `directory`,
    loaded by us with a trained-looking LoRA adapter on every linear layer; returns (our model, the transformers
    model's logits without the adapter)."""
    if not {"hidden_size", "num_hidden_layers", "vocab_size"} <= set(fields):
        raise ValueError(f"give every size (family_config): transformers' defaults are a 7B model, not {fields}")
    hf = random_hf_model(fields)
    with torch.no_grad():
        base_logits = hf(torch.tensor(TOKENS)).logits.numpy()
    hf.save_pretrained(directory)
    model, _ = load_pretrained(directory, quantization=quantization, dtype=jnp.float32)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8), rngs=nnx.Rngs(3))
    for _, module in nnx.iter_graph(model):
        if getattr(module, "lora", None) is not None:
            b = module.lora.lora_B
            b.set_value(np.random.default_rng(3).standard_normal(b[...].shape).astype(np.float32) * 0.05)
    return model, base_logits


def logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS)))


def stored_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (our merged model, its logits, its F32 export), built once per case."""
    built: dict[str, Any] = {}

    def build(case: str):
        if case not in built:
            directory = tmp_path_factory.mktemp(case)
            model, base = tiny_model_with_adapter(directory / "hf", CASES[case])
            ours = logits(model)
            assert np.abs(ours - base).max() > 1e-3  # the adapter matters
            built[case] = (model, ours, save_gguf(model, directory / f"{case}.gguf", tensor_type="f32"))
        return built[case]

    return build


# --- read back by our loader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_f32_export_holds_the_merged_tensors(exported, case):
    """Every merged tensor comes back from the file bit for bit (Gemma's norms up to the rounding of (1 + w) - 1)."""
    model, _, path = exported(case)
    ckpt = read_gguf(path)
    expected = dict(merged_tensors(model, jnp.float32))
    assert set(ckpt.tensor_names) == set(expected)
    for name, array in ckpt.tensors():
        if case.startswith("gemma") and name.endswith("norm.weight"):
            np.testing.assert_allclose(array, expected[name], rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(array, expected[name], err_msg=name)
    assert set(stored_types(path).values()) == {"F32"}
    assert ("output.weight" in stored_types(path)) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("case", CASES)
def test_f32_export_loads_as_the_merged_model(exported, case):
    model, ours, path = exported(case)
    loaded, config = load_pretrained(path, quantization=None, dtype=jnp.float32)
    fields = ("num_kv_heads", "head_dim", "layer_types", "sliding_window", "rope", "rope_local", "attn_scale")
    fields += ("attn_logit_softcap", "final_logit_softcap", "partial_rotary_factor", "qkv_bias", "o_bias", "mlp_bias")
    for field in (*fields, "hidden_act"):
        assert getattr(config, field) == getattr(model.config, field), field
    assert config.eos_token_ids == model.config.eos_token_ids and config.pad_token_id == model.config.pad_token_id
    np.testing.assert_allclose(logits(loaded), ours, atol=2e-5 * np.abs(ours).max())
    if config.rope.rope_type != "default":  # and past the lengths where yarn, longrope and llama3 scale
        long = jnp.asarray(np.random.default_rng(1).integers(1, 96, (1, 40)))
        expected = np.asarray(model(long))
        np.testing.assert_allclose(loaded(long), expected, atol=2e-5 * np.abs(expected).max())


def test_longrope_metadata_is_llamacpps(exported):
    """Phi3MiniModel's converter writes the long and short factors as F32 tables, the original context, and
    transformers' attention scaling sqrt(1 + ln(64 / 16) / ln(16))."""
    _, _, path = exported("phi3-longrope")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, [1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32([1.0, 1.2, 1.5, 2.0]))
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == 16
    expected = np.sqrt(1 + np.log(4.0) / np.log(16.0))
    assert reader.fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("tensor_type", "tolerance"), [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_smaller_tensor_types(tmp_path, tensor_type, tolerance):
    """Matrices in the requested type (Q8_0 rows of 80 values fall back to F16), 1-D tensors in F32; logits close."""
    model, _ = tiny_model_with_adapter(tmp_path / "hf", family_config("llama", **GGUF_FIELDS, intermediate_size=80))
    ours = logits(model)
    path = save_gguf(model, tmp_path / "m.gguf", tensor_type=tensor_type)
    types = stored_types(path)
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == tensor_type.upper()
    assert types["blk.1.ffn_down.weight"] == ("F16" if tensor_type == "q8_0" else tensor_type.upper())
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf_export._TENSOR_TYPES[tensor_type][1]
    loaded, _ = load_pretrained(path, quantization=None, dtype=jnp.float32)
    np.testing.assert_allclose(logits(loaded), ours, atol=tolerance * np.abs(ours).max())


def test_nf4_base_is_dequantized_and_merged(tmp_path):
    model, _ = tiny_model_with_adapter(tmp_path / "hf", CASES["qwen2"], QuantConfig())
    assert model.model.layers.self_attn.q_proj.is_quantized
    path = save_gguf(model, tmp_path / "m.gguf", tensor_type="f32")
    loaded, _ = load_pretrained(path, quantization=None, dtype=jnp.float32)
    ours = logits(model)
    np.testing.assert_allclose(logits(loaded), ours, atol=2e-5 * np.abs(ours).max())


# --- read back by transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_transformers_computes_our_logits_from_the_export(tmp_path, case):
    model, _ = tiny_model_with_adapter(tmp_path / "hf", ORACLE_CASES[case])
    ours = logits(model)
    save_gguf(model, tmp_path / "m.gguf", tensor_type="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        theirs = theirs.eval()(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-5 * np.abs(ours).max())


# --- the real model -------------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_export(smollm2_gguf, tmp_path_factory):
    """SmolLM2 loaded from its GGUF, exported as Q8_0 with the source's tokenizer; (model, export path)."""
    model, _ = load_pretrained(smollm2_gguf, quantization=None, dtype=jnp.float32)
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-q8_0.gguf"
    return model, save_gguf(model, path, tensor_type="q8_0", tokenizer_gguf=smollm2_gguf, name="SmolLM2 export")


def field_values(path: Path) -> dict[str, Any]:
    """Every metadata field as (types, value), arrays as raw bytes, and "tensor types" (reading a large vocabulary
    takes seconds: once per file)."""
    reader = gguf.GGUFReader(path)
    values: dict[str, Any] = {"tensor types": {t.name: t.tensor_type.name for t in reader.tensors}}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            values[key] = (field.types, [bytes(field.parts[i]) for i in field.data])
        elif not key.startswith("GGUF."):
            values[key] = (field.types, field.contents())
    return values


@pytest.fixture(scope="module")
def source_fields(smollm2_gguf):
    return field_values(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_export_keeps_the_tokenizer_and_architecture(source_fields, smollm2_export):
    _, path = smollm2_export
    ours = field_values(path)
    tokenizer_keys = {key for key in source_fields if key.startswith("tokenizer.")}
    assert tokenizer_keys == {key for key in ours if key.startswith("tokenizer.")}
    for key in tokenizer_keys:
        assert ours[key] == source_fields[key], key
    shared = [key for key in source_fields if key.startswith("llama.") and key in ours]
    assert len(shared) == 10
    for key in shared:
        assert ours[key] == source_fields[key], key
    assert ours["general.name"][1] == "SmolLM2 export"
    assert ours["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = ours["tensor types"]
    assert {types[name] for name in types if name.endswith("norm.weight")} == {"F32"}
    assert {types[name] for name in types if not name.endswith("norm.weight")} == {"Q8_0"}


@pytest.fixture(scope="module")
def exported_tokenizer(smollm2_export):
    _, path = smollm2_export
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_transformers_runs_the_smollm2_export_like_us(smollm2_export, exported_tokenizer):
    """transformers' greedy answer from the exported file (model and tokenizer) is our model's: at every step
    our logits on the same tokens pick the token transformers chose."""
    model, path = smollm2_export
    prompt = chat_token_ids(exported_tokenizer, QUESTION)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        answer = (
            theirs.eval()
            .generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(prompt) :
            ]
            .tolist()
        )
    ours = np.asarray(model(jnp.asarray([prompt + answer[:-1]])))[0, len(prompt) - 1 :]
    assert ours.argmax(-1).tolist() == answer
    assert "Paris" in exported_tokenizer.decode(answer)


@pytest.mark.slow
def test_transformers_tokenizer_converts_back_to_the_source_fields(source_fields, smollm2_export, exported_tokenizer):
    """The byte-level BPE conversion (vocabulary, token types, merges, pre-tokenizer, special ids, chat template)
    reproduces what llama.cpp's converter wrote for SmolLM2."""
    model, path = smollm2_export
    ours = field_values(save_gguf(model, path.with_name("converted.gguf"), tokenizer=exported_tokenizer))
    for key in source_fields:
        if key.startswith("tokenizer.") and key != "tokenizer.ggml.add_space_prefix":  # SentencePiece's only
            assert ours[key] == source_fields[key], key
    assert ours["tokenizer.ggml.pre"][1] == "smollm"


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    model, _ = tiny_model_with_adapter(tmp_path_factory.mktemp("llama") / "hf", family_config("llama", **GGUF_FIELDS))
    return model


def with_config(model, **changes):
    """The same model under a modified config (only save_gguf's checks read it)."""
    model = nnx.clone(model)
    model.config = dataclasses.replace(model.config, **changes)
    return model


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(model_type="falcon"), "model_type 'falcon'.*supported: llama, mistral, mixtral, qwen2"),
        (dict(hidden_act="gelu_tanh"), "llama uses silu, not gelu_tanh"),
        (dict(partial_rotary_factor=0.5), "partial rotary"),
        (dict(model_type="qwen3", qkv_bias=True), "no qkv biases"),
        (dict(model_type="gemma2", hidden_act="gelu_tanh", attn_scale=0.1), r"attention by 1/sqrt\(16\)"),
        (dict(rope=RopeConfig(theta=1e4, rope_type="dynamic", factor=2.0)), "no dynamic \\(NTK\\) rope scaling"),
        (dict(rope=RopeConfig(theta=1e4, rope_type="longrope")), "rope_type 'longrope' \\(llama.cpp's llama has no"),
        (
            dict(rope=RopeConfig(theta=1e4, rope_type="yarn", factor=4.0, attention_factor=1.5)),
            "yarn's attention_factor=1.5",
        ),
        (dict(rope=RopeConfig(theta=1e4, rope_type="yarn", factor=4.0, truncate=False)), "yarn's truncate=False"),
    ],
)
def test_unsupported_models_are_refused_before_writing(tiny_llama, tmp_path, changes, message):
    with pytest.raises(GGUFError, match=message):
        save_gguf(with_config(tiny_llama, **changes), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tiny_llama, tmp_path):
    with pytest.raises(GGUFError, match="tensor_type 'q4_0' is not one of f32, f16, bf16, q8_0"):
        save_gguf(tiny_llama, tmp_path / "m.gguf", tensor_type="q4_0")
    not_gguf = tmp_path.parent / f"{tmp_path.name}-notes.gguf"
    not_gguf.write_text("not a model")
    with pytest.raises(GGUFError, match="notes.gguf: cannot read the tokenizer GGUF"):
        save_gguf(tiny_llama, tmp_path / "m.gguf", tokenizer_gguf=not_gguf)
    tokenizers = pytest.importorskip("tokenizers")
    spm = tokenizers.Tokenizer(tokenizers.models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>", byte_fallback=True))
    spm.decoder = tokenizers.decoders.ByteFallback()
    with pytest.raises(GGUFError, match="cannot convert a SentencePiece-style.*tokenizer_gguf="):
        save_gguf(tiny_llama, tmp_path / "m.gguf", tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_object=spm))
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_of_another_vocabulary(tiny_llama, tmp_path, smollm2_gguf):
    with pytest.raises(GGUFError, match="49152 tokens, the model's embedding 96 rows"):
        save_gguf(tiny_llama, tmp_path / "m.gguf", tokenizer_gguf=smollm2_gguf)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_the_existing_file(tiny_llama, tmp_path):
    """A write that fails half-way (at the file size limit, as on a full disk) leaves the previous export as it was,
    and no partial file."""
    resource = pytest.importorskip("resource")  # POSIX
    path = tmp_path / "m.gguf"
    size = save_gguf(tiny_llama, path).stat().st_size
    path.write_bytes(b"the previous export")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        with pytest.raises(OutputError, match="File too large|requested and .* written"):  # EFBIG, or a short write
            save_gguf(tiny_llama, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == b"the previous export" and list(tmp_path.iterdir()) == [path]
    assert save_gguf(tiny_llama, path) == path and path.stat().st_size == size


def test_sliding_window_dropped_for_llama_warns(tiny_llama, tmp_path, caplog):
    model = with_config(tiny_llama, model_type="mistral", sliding_window=3, layer_types=("sliding_attention",) * 2)
    with caplog.at_level(logging.WARNING, logger="qlora_jax.convert.gguf_export"):
        save_gguf(model, tmp_path / "m.gguf")
    assert "3-token sliding window is dropped" in caplog.text
    assert "without a tokenizer" in caplog.text
