"""GGUF export (llama.cpp's format) of a merged model: base weights dequantized, LoRA adapters folded in.

The inverse of `qlora_jax.convert.gguf`, written the way llama.cpp's `convert_hf_to_gguf.py` writes a Hugging Face
checkpoint:

- names from gguf-py's own `TensorNameMap` (`model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`);
- llama (which includes Mistral): the rows of q_proj / k_proj, weights and biases, permuted per head into ggml's
  rotary layout; Gemma 2/3: RMSNorm weights stored as `1 + w`; Llama 3 rope scaling as a `rope_freqs` table;
- the `{arch}.*` metadata llama.cpp reads, and `tokenizer.*` fields copied from a GGUF or built from a
  transformers byte-level BPE tokenizer;
- 1-D tensors (norms, biases) in F32, matrices in F32 / F16 / BF16 / Q8_0.

Streaming: every tensor's name, shape and type is known from the model's slots before any weight is merged, so the
header goes out first and each merged tensor is encoded and appended as `merged_tensors` yields it; host memory
stays near one layer's tensors. The file appears at `path` only once complete (written beside it, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import MODEL_ARCH, TokenType
from gguf import GGMLQuantizationType as Q

from qlora_jax.convert.finite import non_finite
from qlora_jax.convert.gguf import GGUFError
from qlora_jax.convert.merge import merged_tensors
from qlora_jax.convert.state_map import all_keys, model_slots
from qlora_jax.models import DecoderLM, ModelConfig
from qlora_jax.models.config import SLIDING

__all__ = ["EXPORT_MODEL_TYPES", "TENSOR_TYPES", "GGUFError", "save_gguf"]

log = logging.getLogger(__name__)

# model_type -> llama.cpp architecture (Mistral is llama to llama.cpp, as it is to its converter)
_ARCHITECTURES = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "gemma2": MODEL_ARCH.GEMMA2,
    "gemma3_text": MODEL_ARCH.GEMMA3,
    "phi3": MODEL_ARCH.PHI3,
}
EXPORT_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHITECTURES)
# tensor_type -> (storage of the matrices, general.file_type)
_TENSOR_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
TENSOR_TYPES: tuple[str, ...] = tuple(_TENSOR_TYPES)
_ACTIVATIONS = {MODEL_ARCH.GEMMA2: "gelu_tanh", MODEL_ARCH.GEMMA3: "gelu_tanh"}  # silu elsewhere
# llama.cpp scales Gemma attention by 1/sqrt(hidden/heads) for the 27B models, recognised by their layer count,
# and by 1/sqrt(head_dim) otherwise; it fixes the local:global layer patterns too.
_GEMMA = (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3)
_GEMMA_27B_LAYERS = {MODEL_ARCH.GEMMA2: 46, MODEL_ARCH.GEMMA3: 62}
_GEMMA_GLOBAL_EVERY = {MODEL_ARCH.GEMMA2: 2, MODEL_ARCH.GEMMA3: 6}
_PERMUTED = {"attn_q": "num_heads", "attn_k": "num_kv_heads"}  # llama's rotary row permutation, per GGUF name

# tokenizer.ggml.pre: llama.cpp recognises a BPE pre-tokenizer by the hash of the ids it gives this text; the
# text and the hashes are those of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre), for the tokenizers of
# the families exported here.
_PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 to 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # Phi-4
}


def save_gguf(
    model: DecoderLM,
    path: str | os.PathLike[str],
    *,
    tensor_type: str = "f16",
    tokenizer: Any = None,
    tokenizer_gguf: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Path:
    """Writes the merged model (adapters folded in) as one GGUF file that llama.cpp runs; returns its path.

    Args:
      tensor_type: how matrices are stored: "f32", "f16", "bf16" or "q8_0" (rows whose length is not a multiple
        of 32 fall back to F16). Norms, biases and rotary tables are always F32, as llama.cpp stores them.
      tokenizer: a transformers byte-level BPE tokenizer (GPT-2 style: Llama 3, Qwen, SmolLM, ...), converted the
        way convert_hf_to_gguf.py converts it. SentencePiece-style tokenizers cannot be converted: pass
        `tokenizer_gguf` instead.
      tokenizer_gguf: a GGUF file whose `tokenizer.*` fields are copied as they are (the model's source GGUF, or
        any GGUF of the base model); takes precedence over `tokenizer`.
      name: `general.name`.

    With neither tokenizer, the file holds no vocabulary: `load_pretrained` reads it, llama.cpp refuses it.
    Sliding windows of Mistral / Qwen models are dropped with a warning, as convert_hf_to_gguf.py drops them
    (llama.cpp's graphs for them have none).
    Raises GGUFError for a model_type or feature llama.cpp does not implement, before anything is written; an
    existing file at `path` is replaced only by a complete export.
    """
    path = Path(path)
    config = model.config
    arch = _architecture(config)
    if tensor_type.lower() not in _TENSOR_TYPES:
        raise GGUFError(f"tensor_type {tensor_type!r} is not one of {', '.join(TENSOR_TYPES)}")
    matrix_type, file_type = _TENSOR_TYPES[tensor_type.lower()]
    _check_llamacpp_support(config, arch)
    plan = _plan(model, arch, matrix_type)

    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    writer = gguf.GGUFWriter(partial, arch_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        _add_metadata(writer, config, arch)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, config, tokenizer, tokenizer_gguf)
        for gguf_name, shape, qtype in plan.values():
            nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # The writer takes tensor data in the order of the tensor infos, which is the plan's.
        for (hf_name, array), (planned, (gguf_name, shape, qtype)) in zip(_tensors(model), plan.items(), strict=True):
            if hf_name != planned:
                raise GGUFError(f"merged tensors out of order: got {hf_name!r} where {planned!r} was planned")
            if problem := non_finite(array):
                raise GGUFError(f"{path}: tensor {hf_name} {problem}; nothing was written")
            writer.write_tensor_data(_encode(array, gguf_name, shape, qtype, config, arch))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


def _architecture(config: ModelConfig) -> MODEL_ARCH:
    arch = _ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise GGUFError(
            f"cannot export model_type {config.model_type!r} to GGUF; supported: {', '.join(EXPORT_MODEL_TYPES)}"
        )
    return arch


def _check_llamacpp_support(config: ModelConfig, arch: MODEL_ARCH) -> None:
    """Refuses what llama.cpp's graph for `arch` would compute differently (it reads no flag for these)."""
    name = f"{config.model_type} model"

    def refuse(what: str) -> None:
        raise GGUFError(f"cannot export this {name} to GGUF: {what}")

    if config.hidden_act != _ACTIVATIONS.get(arch, "silu"):
        refuse(
            f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} uses {_ACTIVATIONS.get(arch, 'silu')}, not {config.hidden_act}"
        )
    if config.partial_rotary_factor != 1.0 and arch != MODEL_ARCH.PHI3:
        refuse(f"partial rotary embeddings (partial_rotary_factor {config.partial_rotary_factor})")
    rope_types = {MODEL_ARCH.LLAMA: ("default", "linear", "llama3"), MODEL_ARCH.PHI3: ("default",)}
    if config.rope.rope_type not in rope_types.get(arch, ("default", "linear")):
        refuse(f"rope_type {config.rope.rope_type!r} (llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} has no such scaling)")
    # llama's graph takes every bias, Qwen2's those of q, k and v, the others none.
    biases = {"qkv": config.qkv_bias, "o_proj": config.o_bias, "mlp": config.mlp_bias}
    allowed = {MODEL_ARCH.LLAMA: set(biases), MODEL_ARCH.QWEN2: {"qkv"}}.get(arch, set())
    if unsupported := [kind for kind, present in biases.items() if present and kind not in allowed]:
        refuse(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph has no {'/'.join(unsupported)} biases")
    if arch in _GEMMA:
        _check_gemma(config, arch, refuse)
    elif SLIDING in config.layer_types and arch != MODEL_ARCH.PHI3:
        # What convert_hf_to_gguf.py does too (Mistral 7B v0.1's 4096-token window): identical below the window.
        log.warning(
            "llama.cpp's %s attends over the whole context: the %d-token sliding window is dropped, so outputs "
            "differ on sequences longer than that",
            gguf.MODEL_ARCH_NAMES[arch],
            config.sliding_window,
        )


def _check_gemma(config: ModelConfig, arch: MODEL_ARCH, refuse: Any) -> None:
    n_layers = config.num_layers
    scalar = config.hidden_size // config.num_heads if n_layers == _GEMMA_27B_LAYERS[arch] else config.head_dim
    if not math.isclose(config.attn_scale, scalar**-0.5, rel_tol=1e-6):
        refuse(f"llama.cpp scales its attention by 1/sqrt({scalar}), not by {config.attn_scale}")
    every = _GEMMA_GLOBAL_EVERY[arch]
    pattern = tuple("full_attention" if (i + 1) % every == 0 else SLIDING for i in range(n_layers))
    if SLIDING in config.layer_types and config.layer_types != pattern:
        refuse(f"llama.cpp fixes the layer pattern at {every - 1} sliding-window layers to 1 global one")
    if arch == MODEL_ARCH.GEMMA2:
        if not config.tie_word_embeddings:
            refuse("llama.cpp's gemma2 ties the output projection to the embeddings")
        if config.attn_logit_softcap is None or config.final_logit_softcap is None:
            refuse("llama.cpp's gemma2 always soft-caps attention and final logits")
    else:
        if config.attn_logit_softcap is not None:
            refuse("llama.cpp's gemma3 does not soft-cap attention logits")
        if config.rope_local is not None and config.rope_local.rope_type != "default":
            refuse(f"rope scaling ({config.rope_local.rope_type}) on the sliding-window layers")


def _plan(model: DecoderLM, arch: MODEL_ARCH, matrix_type: Q) -> dict[str, tuple[str, tuple[int, ...], Q]]:
    """HF name -> (GGUF name, shape, storage type) of every tensor, in the order `_tensors` yields them."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    plan: dict[str, tuple[str, tuple[int, ...], Q]] = {}
    if config.rope.rope_type == "llama3":
        plan["rope_freqs"] = (
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            (config.rotary_dim // 2,),
            Q.F32,
        )
    for hf_name, slot, _ in all_keys(model_slots(model), config.num_layers):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"no GGUF name for tensor {hf_name!r} of a {gguf.MODEL_ARCH_NAMES[arch]} model")
        shape = tuple(slot.shape)
        qtype = matrix_type if len(shape) > 1 else Q.F32
        if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            qtype = Q.F16  # Q8_0 blocks cover 32 consecutive values of a row
        plan[hf_name] = (gguf_name, shape, qtype)
    return plan


def _tensors(model: DecoderLM) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) of every tensor of the merged model, one at a time, plus llama.cpp's rope table."""
    config = model.config
    if config.rope.rope_type == "llama3":
        yield "rope_freqs", _llama3_rope_freqs(config)
    yield from merged_tensors(model, jnp.float32)


def _llama3_rope_freqs(config: ModelConfig) -> np.ndarray:
    """Llama 3 rope scaling as llama.cpp applies it: each rotary frequency is divided by its entry."""
    rope, dim = config.rope, config.rotary_dim
    low, high, context = rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings
    wavelengths = 2 * np.pi * rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (context / wavelengths - low) / (high - low)
    divisors = np.where(
        wavelengths < context / high,
        1.0,
        np.where(wavelengths > context / low, rope.factor, 1 / ((1 - smooth) / rope.factor + smooth)),
    )
    return divisors.astype(np.float32)


def _encode(
    array: np.ndarray, gguf_name: str, shape: tuple[int, ...], qtype: Q, config: ModelConfig, arch: MODEL_ARCH
) -> np.ndarray:
    """One tensor in llama.cpp's layout, as the bytes (or F32 / F16 values) its storage type holds."""
    array = np.asarray(array, np.float32)
    if array.shape != shape:
        raise GGUFError(f"tensor {gguf_name!r} has shape {array.shape}, expected {shape}")
    base = gguf_name.rsplit(".", 1)[0].rpartition(".")[2]
    if arch == MODEL_ARCH.LLAMA and base in _PERMUTED:
        array = _permute(array, getattr(config, _PERMUTED[base]))
    if arch in _GEMMA and gguf_name.endswith("norm.weight"):
        array = array + np.float32(1.0)  # HF's Gemma RMSNorm scales by (1 + w); llama.cpp's by the stored weight
    return gguf.quants.quantize(array, qtype)


def _permute(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` on the rows: each head's (even, odd) rotary pairs become two halves."""
    rows = array.shape[0]
    return array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, arch: MODEL_ARCH) -> None:
    """The `{arch}.*` keys convert_hf_to_gguf.py writes for this family (and llama.cpp reads)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_rope_dimension_count(config.rotary_dim)
    # llama.cpp defaults the head size to hidden / heads; the converter writes it whenever config.json states it
    # (Qwen3 and Gemma configs always do).
    if config.head_dim != config.hidden_size // config.num_heads or arch in (MODEL_ARCH.QWEN3, *_GEMMA):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope.factor)
    if arch in (*_GEMMA, MODEL_ARCH.PHI3):
        # 0: no window (llama.cpp's marker for Phi-4; Gemma 3 then attends globally in every layer)
        writer.add_sliding_window(config.sliding_window or 0)
    if arch == MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config.attn_logit_softcap)
    if arch in _GEMMA and config.final_logit_softcap is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcap)
    if arch == MODEL_ARCH.GEMMA3 and config.rope_local is not None:
        # add_rope_freq_base_swa is newer than the gguf versions this package accepts
        writer.add_float32(f"{writer.arch}.rope.freq_base_swa", config.rope_local.theta)
    if arch == MODEL_ARCH.PHI3 and (original := config.hf_config.get("original_max_position_embeddings")):
        writer.add_rope_scaling_orig_ctx_len(int(original))


# --- tokenizer ----------------------------------------------------------------------------------------------------


def _add_tokenizer(writer: gguf.GGUFWriter, config: ModelConfig, tokenizer: Any, tokenizer_gguf: Any) -> None:
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf), config.vocab_size)
    elif tokenizer is not None:
        _convert_tokenizer(writer, tokenizer, config)
    else:
        log.warning("GGUF export without a tokenizer: llama.cpp will refuse the file (pass tokenizer=...)")
        _add_special_ids(writer, config)


def _add_special_ids(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """bos / eos / pad from the model config, so that `load_pretrained` gets them back."""
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        writer.add_eos_token_id(config.eos_token_ids[0])
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Every `tokenizer.*` field of another GGUF file, with its stored type (strings as their raw bytes)."""
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        raise GGUFError(f"{source}: cannot read the tokenizer GGUF: {e}") from e
    fields = {key: field for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    tokens = fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise GGUFError(f"{source}: no {gguf.Keys.Tokenizer.LIST!r} to copy")
    if len(tokens.data) != vocab_size:
        raise GGUFError(
            f"{source}: its tokenizer has {len(tokens.data)} tokens, the model's embedding {vocab_size} rows"
        )
    for key, field in fields.items():
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                raise GGUFError(f"{source}: cannot copy the nested array {key!r}")
            if sub == gguf.GGUFValueType.STRING:
                values: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, values, main, sub_type=sub)
        elif main == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), main)
        else:
            writer.add_key_value(key, field.parts[field.data[0]].tolist()[0], main)


def _convert_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: ModelConfig) -> None:
    """A byte-level BPE tokenizer as convert_hf_to_gguf.py's `_set_vocab_gpt2` writes it; gguf-py's SpecialVocab
    reads merges, special ids, add_bos / add_eos and the chat template from the saved tokenizer files."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            tokenizer.save_pretrained(directory)
        except (AttributeError, OSError, TypeError, ValueError) as e:
            raise GGUFError(f"cannot save the tokenizer to convert it: {e}") from e
        kind = _tokenizer_kind(Path(directory) / "tokenizer.json")
        if kind != "byte-level BPE":
            raise GGUFError(
                f"cannot convert a {kind} tokenizer to GGUF (only byte-level BPE ones, as in Llama 3, Qwen or "
                "SmolLM); pass tokenizer_gguf= a GGUF file of the base model, whose tokenizer is copied"
            )
        tokens, types = _bpe_vocabulary(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # SpecialVocab falls back to config.json for the special ids the tokenizer files do not name
        special_ids = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
        special_ids["eos_token_id"] = config.eos_token_ids[0] if config.eos_token_ids else None
        (Path(directory) / "config.json").write_text(json.dumps(special_ids))
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config.vocab_size)
    # Whether to add bos / eos, where the saved files do not say (transformers' tokenizers built from a GGUF keep
    # no add_bos_token): what the tokenizer itself does.
    ids = tokenizer.encode("a")
    for kind, position in (("bos", 0), ("eos", -1)):
        if (token_id := special.special_token_ids.get(kind)) is not None:
            special.add_special_token.setdefault(kind, bool(ids) and ids[position] == token_id)
    special.add_to_gguf(writer, quiet=True)


def _tokenizer_kind(tokenizer_json: Path) -> str:
    if not tokenizer_json.is_file():
        return "slow (no tokenizer.json)"
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "byte-level BPE"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "SentencePiece-style (byte-fallback BPE)"
    return str(model.get("type", "unknown"))


def _bpe_vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for every embedding row, unused rows as `[PAD{i}]` (get_vocab_base)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(vocab.values())}, the model's embedding {vocab_size} rows")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token_type = TokenType.NORMAL
        if token in added:
            info = decoder.get(i)
            if info is not None and not info.normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if (info is not None and info.special) or _looks_special(token):
                token_type = TokenType.CONTROL
            else:
                token, token_type = token.replace("\u2581", " "), TokenType.USER_DEFINED
        tokens.append(token)
        types.append(token_type)
    return tokens, types


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>") or (token.startswith(("<|", "<｜")) and token.endswith(("|>", "｜>")))


def _pre_tokenizer(tokenizer: Any) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(_PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(digest)
    if pre is None:
        log.warning(
            "unknown BPE pre-tokenizer (hash %s): written as 'default'; llama.cpp may split text differently from "
            "transformers (pass tokenizer_gguf= a GGUF of the base model to copy its tokenizer instead)",
            digest,
        )
        return "default"
    return pre
