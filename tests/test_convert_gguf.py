"""GGUF checkpoints: the real SmolLM2 file against transformers' GGUF loader, and synthetic files per architecture
written the way llama.cpp's convert_hf_to_gguf.py writes them, read back against the Hugging Face model."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from qlora_jax.convert.gguf import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TENSOR_TYPES,
    GGUFCheckpoint,
    GGUFError,
    from_ggml_rows,
    permuted_heads,
    read_gguf,
    to_ggml_rows,
)
from tests.families import SPECIAL_TOKENS, family_config

ARCH_ENUMS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# Every 2-D weight of a synthetic model takes the next of these (gguf.quants can encode them all); 1-D stays F32.
WEIGHT_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16, Q.F32)


# --- a small llama.cpp converter -------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    """`metadata` maps GGUFWriter.add_* method names to their argument (a tuple for several); tensors are
    (values, type to store them as)."""
    writer = gguf.GGUFWriter(path, arch)
    for method, value in metadata.items():
        getattr(writer, method)(*value if isinstance(value, tuple) else (value,))
    for name, (values, qtype) in tensors.items():
        writer.add_tensor(name, encode(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    if values.dtype == np.uint8 or qtype == Q.F64:  # raw blocks, or a type gguf.quants does not know
        return values
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def roundtrip(values: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(encode(values, qtype), qtype).reshape(values.shape)


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(kw: dict[str, Any]) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: the per-frequency divisors of Llama 3 rope scaling (with the context
    length of rope_scaling, which HF uses, where llama.cpp reads a top-level one and defaults to 8192)."""
    rope, dim, base = kw["rope_scaling"], kw["head_dim"], kw["rope_theta"]
    low, high, context = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(rope["factor"])
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def llamacpp_metadata(arch: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The key/values the converter classes (LlamaModel, Qwen2Model, Gemma2Model, ...) write for a config."""
    meta = {
        "add_block_count": kw["num_hidden_layers"],
        "add_context_length": kw["max_position_embeddings"],
        "add_embedding_length": kw["hidden_size"],
        "add_feed_forward_length": kw["intermediate_size"],
        "add_head_count": kw["num_attention_heads"],
        "add_head_count_kv": kw["num_key_value_heads"],
        "add_layer_norm_rms_eps": kw["rms_norm_eps"],
        "add_token_list": [f"<t{i}>" for i in range(kw["vocab_size"])],
        "add_bos_token_id": kw["bos_token_id"],
        "add_eos_token_id": kw["eos_token_id"],
        "add_pad_token_id": kw["pad_token_id"],
    }
    if arch != "gemma2":  # Gemma2Model writes no rope base
        meta["add_rope_freq_base"] = kw["rope_theta"]
    if arch == "llama":
        meta.update(add_vocab_size=kw["vocab_size"], add_rope_dimension_count=kw["head_dim"])
    if arch in ("qwen3", "gemma2", "gemma3"):
        meta.update(add_key_length=kw["head_dim"], add_value_length=kw["head_dim"])
    if arch in ("gemma2", "gemma3", "phi3"):
        meta["add_sliding_window"] = kw["sliding_window"]
    if arch == "gemma2":
        meta["add_attn_logit_softcapping"] = kw["attn_logit_softcapping"]
        meta["add_final_logit_softcapping"] = kw["final_logit_softcapping"]
    if kw.get("rope_scaling", {}).get("rope_type") == "linear":
        meta.update(
            add_rope_scaling_type=gguf.RopeScalingType.LINEAR, add_rope_scaling_factor=kw["rope_scaling"]["factor"]
        )
    if arch == "phi3":
        meta["add_rope_dimension_count"] = (
            int(kw["partial_rotary_factor"] * kw["hidden_size"]) // kw["num_attention_heads"]
        )
        meta["add_rope_scaling_orig_ctx_len"] = kw["original_max_position_embeddings"]
    return meta


def llamacpp_tensors(arch: str, kw: dict[str, Any], state: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF-named arrays: gguf-py's own name map, llama's q/k permutation, gemma's 1 + w norms."""
    names = gguf.get_tensor_name_map(ARCH_ENUMS[arch], kw["num_hidden_layers"])
    heads, kv_heads = kw["num_attention_heads"], kw["num_key_value_heads"]
    out = {}
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        base, _, suffix = hf_name.rpartition(".")
        if arch == "llama" and base.endswith("q_proj"):
            w = llamacpp_permute(w, heads, heads)
        if arch == "llama" and base.endswith("k_proj"):
            w = llamacpp_permute(w, heads, kv_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            w = w + 1
        out[f"{names.get_name(base)}.{suffix}"] = w
    rope = kw.get("rope_scaling", {})
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_freqs(kw)
    if rope.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    return out


def with_types(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, Q]]:
    types = itertools.cycle(WEIGHT_TYPES)
    return {name: (w, next(types) if w.ndim == 2 else Q.F32) for name, w in tensors.items()}


# --- synthetic models of every architecture, checked against transformers ---------------------------------------

# The tiny families, as llama.cpp's converter would find them in config.json (their longer contexts, its Llama 3
# context of 8192, its Gemma scale and 5:1 layer pattern); a head_dim of 16 leaves one Llama 3 frequency in the
# smooth band, 64 several.
GGUF_FIELDS = dict(rms_norm_eps=1e-6, max_position_embeddings=512, **SPECIAL_TOKENS)
LLAMA3 = dict(rope_type="llama3", original_max_position_embeddings=8192)


def gguf_case(family: str, **changes: Any) -> dict[str, Any]:
    return family_config(family, **(GGUF_FIELDS | changes))


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "llama",
        gguf_case("llama", head_dim=16, rope_theta=10000.0, attention_bias=True, tie_word_embeddings=False),
    ),
    "llama3-rope": (
        "llama",
        gguf_case(
            "llama3.2",
            head_dim=16,
            max_position_embeddings=131072,
            rope_scaling={**LLAMA3, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        ),
    ),
    "llama3-rope-custom": (
        "llama",
        gguf_case(
            "llama3.2",
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            max_position_embeddings=131072,
            rope_scaling={**LLAMA3, "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
        ),
    ),
    "qwen2": ("qwen2", gguf_case("qwen2", rope_theta=1000000.0)),
    "qwen3": ("qwen3", gguf_case("qwen3", rope_theta=1000000.0, tie_word_embeddings=False)),
    "gemma2": (
        "gemma2",
        gguf_case(
            "gemma2",
            query_pre_attn_scalar=16,
            rope_theta=10000.0,
            sliding_window=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),
    # six layers so that the last one is global (HF and llama.cpp both use a 5:1 local:global pattern)
    "gemma3": (
        "gemma3",
        gguf_case(
            "gemma3",
            num_hidden_layers=6,
            layer_types=None,
            sliding_window=256,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        ),
    ),
    "phi3": (
        "phi3",
        gguf_case(
            "phi3",
            rope_theta=10000.0,
            partial_rotary_factor=0.5,
            sliding_window=255,
            original_max_position_embeddings=128,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "longrope",
                "long_factor": [1.0, 1.5, 2.25, 4.0],
                "short_factor": [1.0, 1.1, 1.2, 1.5],
            },
        ),
    ),
}
# Config fields that must survive the round trip (besides the rotary parameters and the weights themselves).
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "layer_types",
    "original_max_position_embeddings",
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """case -> (original HF model with round-tripped weights, our checkpoint, path), built once per case."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    built: dict[str, Any] = {}

    def build(case: str):
        if case not in built:
            arch, fields = CASES[case]
            kw = {k: v for k, v in fields.items() if k != "model_type"}
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(fields["model_type"], **kw)
            )
            with torch.no_grad():  # random norms and biases too, so that offsets and permutations show
                for p in model.parameters():
                    p.normal_(0.0, 0.5)
            state = {k: v.numpy() for k, v in model.state_dict().items()}
            tensors = with_types(llamacpp_tensors(arch, kw, state, model.config.tie_word_embeddings))
            path = tmp_path_factory.mktemp(case) / f"{case}.gguf"
            write_gguf(path, arch, llamacpp_metadata(arch, kw), tensors)
            # The weights we should get back: quantization commutes with the permutation (it only moves whole rows).
            names = gguf.get_tensor_name_map(ARCH_ENUMS[arch], kw["num_hidden_layers"])
            if model.config.tie_word_embeddings:
                del state["lm_head.weight"]
            for hf_name, w in state.items():
                base, _, suffix = hf_name.rpartition(".")
                state[hf_name] = roundtrip(w, tensors[f"{names.get_name(base)}.{suffix}"][1])
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
            built[case] = (model.eval(), read_gguf(path), path)
        return built[case]

    return build


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_roundtrip(synthetic, case):
    """Names, shapes and values come back as the HF model had them (up to the stored type's rounding)."""
    model, ckpt, _ = synthetic(case)
    arch = CASES[case][0]
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert ckpt.architecture == arch
    assert set(ckpt.tensor_names) == set(expected)
    for name, array in ckpt.tensors():
        assert array.dtype == np.float32 and array.shape == expected[name].shape, name
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            np.testing.assert_allclose(array, expected[name], rtol=0, atol=1e-6, err_msg=name)  # (1 + w) - 1
        else:
            np.testing.assert_array_equal(array, expected[name], err_msg=name)


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_config_and_logits(synthetic, case):
    """Our config rebuilds the same transformers config, and the model loaded from it computes the same logits."""
    import torch
    import transformers

    model, ckpt, _ = synthetic(case)
    config = transformers.AutoConfig.for_model(**ckpt.config)
    assert type(config) is type(model.config)
    for field in CONFIG_FIELDS:
        if hasattr(model.config, field):  # qwen2 and phi3 configs have no head_dim: it is hidden_size // heads
            assert getattr(config, field) == getattr(model.config, field), field
    assert config.rope_parameters == model.config.rope_parameters
    ours = transformers.AutoModelForCausalLM.from_config(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.tensors()}, strict=not config.tie_word_embeddings)
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_matches_transformers_loader(synthetic, case):
    """transformers' own GGUF loader reads the same synthetic file into the same tensors."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, ckpt, path = synthetic(case)
    with torch.device("meta"):
        target = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**ckpt.config))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=target)["tensors"]
    assert set(theirs) == set(ckpt.tensor_names)
    for name, array in ckpt.tensors():
        np.testing.assert_array_equal(array, theirs[name].numpy(), err_msg=name)


@pytest.mark.oracle
def test_llama_permutation_is_undone(synthetic):
    """The GGUF holds q_proj / k_proj (and their biases) permuted; we hand back HF's rows."""
    model, ckpt, path = synthetic("llama")
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for hf, g in (("q_proj.weight", "attn_q.weight"), ("k_proj.bias", "attn_k.bias")):
        stored = gguf.quants.dequantize(raw[f"blk.1.{g}"].data, raw[f"blk.1.{g}"].tensor_type)
        ours = ckpt.tensor(f"model.layers.1.self_attn.{hf}")
        assert not np.array_equal(stored.reshape(ours.shape), ours)
        np.testing.assert_array_equal(ours, model.state_dict()[f"model.layers.1.self_attn.{hf}"].numpy())


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (2, 1)])
def test_rotary_rows_are_permuted_as_llamacpp_does(heads, kv_heads):
    """One owner of the permutation for reader and writer: `to_ggml_rows` is convert_hf_to_gguf.py's own, and
    `from_ggml_rows` undoes it, weights and biases alike."""
    rng = np.random.default_rng(0)
    for shape in ((heads * 8, 5), (heads * 8,)):
        w = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(to_ggml_rows(w, heads), llamacpp_permute(w, heads, heads))
        np.testing.assert_array_equal(from_ggml_rows(to_ggml_rows(w, heads), heads), w)
    k = rng.standard_normal((kv_heads * 8, 5)).astype(np.float32)
    assert permuted_heads("llama", "blk.0.attn_k.weight", num_heads=heads, num_kv_heads=kv_heads) == kv_heads
    np.testing.assert_array_equal(to_ggml_rows(k, kv_heads), llamacpp_permute(k, heads, kv_heads))
    assert permuted_heads("llama", "blk.0.attn_q.bias", num_heads=heads, num_kv_heads=kv_heads) == heads
    assert permuted_heads("qwen2", "blk.0.attn_q.weight", num_heads=heads, num_kv_heads=kv_heads) is None
    assert permuted_heads("llama", "blk.0.attn_v.weight", num_heads=heads, num_kv_heads=kv_heads) is None
    with pytest.raises(GGUFError, match="not a whole number of rotary pairs"):
        to_ggml_rows(np.zeros((heads * 8 + 2, 3), np.float32), heads)


def test_gguf_name_tables_agree():
    """Our explicit tables name what gguf-py's TensorNameMap maps to each GGUF tensor, for every architecture."""
    from qlora_jax.convert import gguf as module

    for arch in SUPPORTED_ARCHITECTURES:
        name_map = gguf.get_tensor_name_map(ARCH_ENUMS[arch], 2)
        known = set(gguf.MODEL_TENSORS[ARCH_ENUMS[arch]])
        for t, hf in [*module._GLOBAL_NAMES.items(), *module._BLOCK_NAMES[arch].items()]:
            if t not in known:  # gemma2 is always tied: gguf-py lists no output tensor for it
                assert (arch, t) == ("gemma2", gguf.MODEL_TENSOR.OUTPUT)
                continue
            hf_name = hf if t in module._GLOBAL_NAMES else f"model.layers.1.{hf}"
            assert name_map.get_name(hf_name) == gguf.TENSOR_NAMES[t].format(bid=1), (arch, hf_name)


# --- config details without a model -----------------------------------------------------------------------------


def minimal_metadata(arch: str, n_layers: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "add_block_count": n_layers,
        "add_context_length": 64,
        "add_embedding_length": 256,
        "add_feed_forward_length": 256,
        "add_head_count": 4,
        "add_layer_norm_rms_eps": 1e-5,
        **extra,
    }


def skeleton(n_layers: int = 1, rows: int = 8) -> dict[str, tuple[np.ndarray, Q]]:
    """An embedding and one norm per block: the least a file needs to be read."""
    norms = {f"blk.{i}.attn_norm.weight": (np.ones(256, np.float32), Q.F32) for i in range(n_layers)}
    return {"token_embd.weight": (np.ones((rows, 256), np.float32), Q.F32), **norms}


@pytest.mark.parametrize(("arch", "n_layers", "scalar"), [("gemma2", 46, 64), ("gemma2", 42, 16), ("gemma3", 62, 64)])
def test_gemma_query_scale_follows_llamacpp(tmp_path, arch, n_layers, scalar):
    """llama.cpp scales by 1/sqrt(hidden / heads) for the 27B models (46 / 62 layers) and by 1/sqrt(head_dim) else."""
    meta = minimal_metadata(arch, n_layers, add_key_length=16, add_value_length=16, add_sliding_window=0)
    ckpt = read_gguf(write_gguf(tmp_path / "g.gguf", arch, meta, skeleton(n_layers)))
    assert ckpt.config["query_pre_attn_scalar"] == scalar
    if arch == "gemma3":  # no sliding window written: every layer attends globally
        assert ckpt.config["sliding_window"] is None and set(ckpt.config["layer_types"]) == {"full_attention"}


def test_yarn_rope_scaling(tmp_path):
    meta = minimal_metadata(
        "qwen2",
        add_rope_scaling_type=gguf.RopeScalingType.YARN,
        add_rope_scaling_factor=4.0,
        add_rope_scaling_orig_ctx_len=32768,
    )
    ckpt = read_gguf(write_gguf(tmp_path / "y.gguf", "qwen2", meta, skeleton()))
    assert ckpt.config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    assert ckpt.config["tie_word_embeddings"] is True and ckpt.config["vocab_size"] == 8
    assert ckpt.config["rope_theta"] == 10000.0 and ckpt.config["num_key_value_heads"] == 4


def test_every_supported_type_decodes_like_gguf(tmp_path):
    """Each block format (random blocks, including the K- and I-quants gguf-py cannot encode) comes back exactly as
    gguf.quants.dequantize decodes it, in HF shape."""
    rng = np.random.default_rng(0)
    per_block = {
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "ffn_norm": "post_attention_layernorm",
    }
    slots = [(f"blk.{b}.{g}.weight", f"model.layers.{b}.{hf}.weight") for b in range(4) for g, hf in per_block.items()]
    tensors, expected = skeleton(4), {}
    for (gguf_name, hf_name), type_name in zip(slots, SUPPORTED_TENSOR_TYPES, strict=True):
        qtype = Q[type_name]
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        # bytes below 0x3C keep every float16 / bfloat16 / float32 field finite
        raw = rng.integers(0, 0x3C, size=(3, 256 // block * nbytes), dtype=np.uint8)
        tensors[gguf_name] = (raw, qtype)
        expected[hf_name] = (gguf.quants.dequantize(raw, qtype), type_name)
    ckpt = read_gguf(write_gguf(tmp_path / "types.gguf", "llama", minimal_metadata("llama", 4), tensors))
    for hf_name, (values, type_name) in expected.items():
        array = ckpt.tensor(hf_name)
        assert array.shape == (3, 256) and array.dtype == np.float32, type_name
        np.testing.assert_array_equal(array, values, err_msg=type_name)


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path) -> Path:
    tensors = {**skeleton(), "blk.0.attn_q.weight": (np.ones((256, 256), np.float32), Q.Q8_0)}
    return write_gguf(tmp_path / "good.gguf", "llama", minimal_metadata("llama"), tensors)


def test_good_file_reads(good_file):
    ckpt = read_gguf(good_file)
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.config["head_dim"] == 64
    assert ckpt.tensor_names == (
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
    )
    embedding = ckpt.tensor("model.embed_tokens.weight")  # F32: a copy, not a view of the read-only memory map
    embedding += 1
    np.testing.assert_array_equal(ckpt.tensor("model.embed_tokens.weight"), np.ones((8, 256), np.float32))


def test_not_a_gguf_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n" * 10)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (text, empty, tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(GGUFError, match=str(path)):
            read_gguf(path)


def test_truncated_file(tmp_path, good_file):
    """Cut anywhere (header, metadata, tensor infos, tensor data), the file is reported, never half-read."""
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in sorted({*range(0, 400, 7), *range(400, len(data), 997), len(data) - 1}):
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFError, match="cut.gguf"):
            read_gguf(cut)


def test_truncated_real_file(tmp_path, smollm2_gguf):
    cut = tmp_path / "smollm2-cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(smollm2_gguf.stat().st_size - 4096))
    with pytest.raises(GGUFError, match="smollm2-cut.gguf.*truncated"):
        read_gguf(cut)


def test_an_array_longer_than_the_file_is_refused_at_once(tmp_path):
    """A metadata array that claims 2^40 one-byte elements in a 64-byte file: gguf's reader alone would loop over
    them reading nothing (minutes to years); ours stops at the end of the file."""
    key = b"general.tags"
    header = b"GGUF" + np.array([3], "<u4").tobytes() + np.array([0, 1, len(key)], "<u8").tobytes() + key
    array = np.array([gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8], "<u4").tobytes()
    path = tmp_path / "long-array.gguf"
    path.write_bytes(header + array + np.array([2**40], "<u8").tobytes() + bytes(8))
    with pytest.raises(GGUFError, match=r"long-array\.gguf.*run past the end of the file"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", "bert", minimal_metadata("bert"), skeleton())
    with pytest.raises(GGUFError, match=r"bert\.gguf.*'bert'.*llama, qwen2, qwen3, gemma2, gemma3, phi3"):
        read_gguf(path)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "rope_freqs.weight"])
def test_unsupported_tensor_type(tmp_path, name):
    tensors = {**skeleton(), name: (np.ones((8, 256), np.float64), Q.F64)}
    path = write_gguf(tmp_path / "f64.gguf", "llama", minimal_metadata("llama"), tensors)
    with pytest.raises(GGUFError, match=rf"f64\.gguf.*'{re.escape(name)}'.*F64"):
        read_gguf(path)


@pytest.mark.parametrize(
    "name",
    ["blk.0.ffn_gate_shexp.weight", "blk.0.attn_qkv.weight", "blk.00.attn_q.weight", "foo.weight", "output.scale"],
)
def test_unmappable_tensor(tmp_path, name):
    tensors = {**skeleton(), name: (np.ones((8, 256), np.float32), Q.F32)}
    path = write_gguf(tmp_path / "odd.gguf", "llama", minimal_metadata("llama"), tensors)
    with pytest.raises(GGUFError, match=rf"odd\.gguf.*'{name}'"):
        read_gguf(path)


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ("add_block_count", "llama.block_count"),
        ("add_embedding_length", "llama.embedding_length"),
        ("add_layer_norm_rms_eps", "llama.attention.layer_norm_rms_epsilon"),
    ],
)
def test_missing_metadata(tmp_path, method, key):
    meta = minimal_metadata("llama")
    del meta[method]
    path = write_gguf(tmp_path / "nometa.gguf", "llama", meta, skeleton())
    with pytest.raises(GGUFError, match=rf"nometa\.gguf.*missing metadata field '{key}'"):
        read_gguf(path)


def test_bad_metadata(tmp_path):
    meta = minimal_metadata("llama")
    del meta["add_embedding_length"]
    wrong = write_gguf(
        tmp_path / "str.gguf", "llama", meta | {"add_string": ("llama.embedding_length", "wide")}, skeleton()
    )
    with pytest.raises(GGUFError, match=r"str\.gguf.*'llama\.embedding_length'.*'wide'"):
        read_gguf(wrong)
    split = write_gguf(
        tmp_path / "part.gguf", "llama", minimal_metadata("llama", add_uint16=("split.count", 3)), skeleton()
    )
    with pytest.raises(GGUFError, match=r"part\.gguf.*3 split files"):
        read_gguf(split)
    tensors = {"blk.0.attn_norm.weight": (np.ones(256, np.float32), Q.F32)}
    no_embedding = write_gguf(tmp_path / "noembd.gguf", "llama", minimal_metadata("llama"), tensors)
    with pytest.raises(GGUFError, match=r"noembd\.gguf.*'token_embd\.weight'"):
        read_gguf(no_embedding)


@pytest.mark.parametrize(
    ("arch", "name", "message"),
    [
        ("llama", "rope_freqs.weight", "does not follow Llama 3 rope scaling"),
        ("phi3", "rope_factors_long.weight", "only one of rope_factors_long.weight and rope_factors_short.weight"),
    ],
)
def test_bad_rope_tables(tmp_path, arch, name, message):
    meta = minimal_metadata(arch, add_rope_dimension_count=64)
    tensors = {**skeleton(), name: (np.linspace(1.0, 3.0, 32, dtype=np.float32) ** 2, Q.F32)}
    with pytest.raises(GGUFError, match=rf"rope\.gguf.*{message}"):
        read_gguf(write_gguf(tmp_path / "rope.gguf", arch, meta, tensors))


@pytest.mark.parametrize("heads", [("add_head_count", 0), ("add_head_count_kv", 0), ("add_key_length", 0)])
def test_zero_heads(tmp_path, heads):
    path = write_gguf(tmp_path / "heads.gguf", "qwen3", minimal_metadata("qwen3", **dict([heads])), skeleton())
    with pytest.raises(GGUFError, match=r"heads\.gguf"):
        read_gguf(path)


@pytest.mark.parametrize(("n_layers", "blocks"), [(3, 2), (1, 0), (2, 3)])
def test_block_count_disagrees_with_tensors(tmp_path, n_layers, blocks):
    path = write_gguf(tmp_path / "blocks.gguf", "llama", minimal_metadata("llama", n_layers), skeleton(blocks))
    with pytest.raises(GGUFError, match=rf"blocks\.gguf: block_count is {n_layers}, but tensors fill"):
        read_gguf(path)


def test_unknown_tensor_requested(good_file):
    ckpt = read_gguf(good_file)
    with pytest.raises(GGUFError, match=r"good\.gguf.*'model\.layers\.0\.mlp\.up_proj\.weight'"):
        ckpt.tensor("model.layers.0.mlp.up_proj.weight")


# --- the real model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_oracle(smollm2_gguf):
    """transformers' config and tensors for the bundled SmolLM2 GGUF."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.device("meta"):
        target = transformers.AutoModelForCausalLM.from_config(config)
    return config, load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=target)["tensors"]


@pytest.mark.oracle
@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf, smollm2_oracle):
    """Every tensor equals transformers' (same dequantization, same un-permutation: bit for bit), and the config
    agrees with the one transformers derives (rms_norm_eps up to its float32 storage)."""
    import transformers

    hf_config, theirs = smollm2_oracle
    ckpt = read_gguf(smollm2_gguf)
    assert ckpt.architecture == "llama"
    config = ckpt.config
    for field in (*CONFIG_FIELDS[:7], "max_position_embeddings", "vocab_size", "tie_word_embeddings", "model_type"):
        assert config[field] == getattr(hf_config, field), field
    for field in ("bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias"):
        assert config[field] == getattr(hf_config, field), field
    assert math.isclose(config["rms_norm_eps"], hf_config.rms_norm_eps, rel_tol=1e-6)
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"] == 100000.0
    assert "rope_scaling" not in config and hf_config.rope_parameters["rope_type"] == "default"
    assert transformers.AutoConfig.for_model(**config).rope_parameters == hf_config.rope_parameters
    assert set(ckpt.tensor_names) == set(theirs) and "lm_head.weight" not in theirs
    for name, array in ckpt.tensors():
        np.testing.assert_array_equal(array, theirs[name].numpy(), err_msg=name)
