"""GGUF export (llama.cpp's format) of a merged model: base weights dequantized, LoRA adapters folded in.

The inverse of `qlora_jax.convert.gguf`, written the way llama.cpp's `convert_hf_to_gguf.py` writes a Hugging Face
checkpoint:

- names from gguf-py's own `TensorNameMap` (`model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`);
- llama (which includes Mistral): the rows of q_proj / k_proj, weights and biases, permuted per head into ggml's
  rotary layout; Gemma 2/3: RMSNorm weights stored as `1 + w` (both as `qlora_jax.convert.gguf` defines them);
  Llama 3 rope scaling as a `rope_freqs` table (`RopeConfig.frequency_divisors`);
- the `{arch}.*` metadata llama.cpp reads, and `tokenizer.*` fields copied from a GGUF or built from a
  transformers byte-level BPE tokenizer (`qlora_jax.convert.gguf_tokenizer`);
- 1-D tensors (norms, biases) in F32, matrices in F32 / F16 / BF16 / Q8_0.

Streaming: every tensor's name, shape and type is known from the model's slots before any weight is merged, so the
header goes out first and each merged tensor is encoded and appended as `merged_tensors` yields it; host memory
stays near one layer's tensors. The file appears at `path` only once complete (written beside it, then renamed).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import MODEL_ARCH
from gguf import GGMLQuantizationType as Q

from qlora_jax.convert.finite import non_finite
from qlora_jax.convert.gguf import norm_offset, permuted_heads, to_ggml_rows
from qlora_jax.convert.gguf_tokenizer import add_tokenizer
from qlora_jax.convert.merge import merged_tensors, merged_weight
from qlora_jax.convert.moe_io import checkpoint_name, expert_modules
from qlora_jax.convert.state_map import all_keys, model_slots
from qlora_jax.files import output_error
from qlora_jax.integrity import GGUF_CHECKSUM_KEY, GGUF_PENDING, seal_gguf
from qlora_jax.models import DecoderLM, ModelConfig
from qlora_jax.models.config import SLIDING
from qlora_jax.models.config_files import GEMMA_27B_LAYERS, MODEL_TYPES, GGUFError

__all__ = ["EXPORT_MODEL_TYPES", "TENSOR_TYPES", "GGUFError", "save_gguf"]

log = logging.getLogger(__name__)

_ARCH_ENUMS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# model_type -> llama.cpp architecture: the reader's table inverted, plus Mistral, which is llama to llama.cpp (as it
# is to its converter)
_ARCHITECTURES = {
    model_type: _ARCH_ENUMS[name]
    for name, (model_type, _) in MODEL_TYPES.items()
    for model_type in ((model_type, "mistral", "mixtral") if name == "llama" else (model_type,))
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
# llama.cpp fixes Gemma's local:global layer patterns (and its attention scale: GEMMA_27B_LAYERS).
_GEMMA = (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3)
_GEMMA_GLOBAL_EVERY = {MODEL_ARCH.GEMMA2: 2, MODEL_ARCH.GEMMA3: 6}


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
        add_tokenizer(writer, config, tokenizer, tokenizer_gguf)
        writer.add_string(GGUF_CHECKSUM_KEY, GGUF_PENDING)  # sealed below, once the tensor data is written
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
        seal_gguf(partial, gguf.GGUFReader(partial).data_offset)
        os.replace(partial, path)
    except BaseException as e:
        try:
            writer.close()
        except OSError:
            pass  # flushing the rest onto the full disk fails too
        partial.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk ("N requested and M written" from numpy), no permission
            raise output_error(e, path, "the GGUF file") from e
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
    _check_rope(config.rope, arch, refuse)
    # llama's graph takes every bias, Qwen2's those of q, k and v, the others none.
    biases = {"qkv": config.qkv_bias, "o_proj": config.o_bias, "mlp": config.mlp_bias}
    allowed = {MODEL_ARCH.LLAMA: set(biases), MODEL_ARCH.QWEN2: {"qkv"}}.get(arch, set())
    if unsupported := [kind for kind, present in biases.items() if present and kind not in allowed]:
        refuse(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph has no {'/'.join(unsupported)} biases")
    if config.moe is not None and not config.moe.norm_topk_prob:
        refuse(
            f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} always renormalizes the top-k routing weights "
            f"(norm_topk_prob false here)"
        )
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


# The rope scalings llama.cpp implements for each architecture, as convert_hf_to_gguf.py writes them: linear and yarn
# as `rope.scaling.*` keys, llama3 as a `rope_freqs` table (LlamaModel), longrope as `rope_factors_long` / `_short`
# tables (Phi3MiniModel). llama.cpp has no dynamic (NTK) scaling.
_ROPE_TYPES = {
    MODEL_ARCH.LLAMA: ("default", "linear", "yarn", "llama3"),
    MODEL_ARCH.QWEN2: ("default", "linear", "yarn"),
    MODEL_ARCH.QWEN3: ("default", "linear", "yarn"),
    MODEL_ARCH.PHI3: ("default", "longrope"),
}
# yarn fields llama.cpp has no key for: its yarn derives the attention scaling from the factor alone and always
# truncates the ramp's ends to whole dimensions.
_YARN_DEFAULTS = {"attention_factor": None, "mscale": None, "mscale_all_dim": None, "truncate": True}


def _check_rope(rope: Any, arch: MODEL_ARCH, refuse: Any) -> None:
    name = gguf.MODEL_ARCH_NAMES[arch]
    if rope.rope_type not in _ROPE_TYPES.get(arch, ("default", "linear")):
        why = (
            "llama.cpp has no dynamic (NTK) rope scaling"
            if rope.rope_type == "dynamic"
            else (f"llama.cpp's {name} has no such scaling")
        )
        refuse(f"rope_type {rope.rope_type!r} ({why})")
    if rope.rope_type == "yarn":
        for field, default in _YARN_DEFAULTS.items():
            if getattr(rope, field) != default:
                refuse(
                    f"yarn's {field}={getattr(rope, field)!r} (llama.cpp's yarn has no such setting; it computes "
                    f"the attention scaling from the factor alone and truncates the ramp)"
                )


def _check_gemma(config: ModelConfig, arch: MODEL_ARCH, refuse: Any) -> None:
    n_layers = config.num_layers
    is_27b = n_layers == GEMMA_27B_LAYERS[gguf.MODEL_ARCH_NAMES[arch]]
    scalar = config.hidden_size // config.num_heads if is_27b else config.head_dim
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
    for hf_name, _ in _rope_tables(config):
        plan[hf_name] = (gguf.TENSOR_NAMES[_ROPE_TENSORS[hf_name]] + ".weight", (config.rotary_dim // 2,), Q.F32)
    for hf_name, slot, _ in all_keys(model_slots(model), config.num_layers):
        hf_name = checkpoint_name(config, hf_name)  # as `merged_tensors` names it (Mixtral's block_sparse_moe)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"no GGUF name for tensor {hf_name!r} of a {gguf.MODEL_ARCH_NAMES[arch]} model")
        shape = tuple(slot.shape)
        qtype = matrix_type if len(shape) > 1 else Q.F32
        if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            qtype = Q.F16  # Q8_0 blocks cover 32 consecutive values of a row
        plan[hf_name] = (gguf_name, shape, qtype)
    for hf_name, shape in _expert_shapes(model):  # after every other tensor, as `_tensors` yields them
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        qtype = matrix_type if matrix_type != Q.Q8_0 or not shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] else Q.F16
        plan[hf_name] = (gguf_name, shape, qtype)
    return plan


# A mixture of experts' experts as llama.cpp stores them: every expert's gate, up and down in one [E, out, in]
# tensor each (gguf-py's HF names mlp.experts.{gate,up,down}_proj: blk.N.ffn_{gate,up,down}_exps).
_EXPERT_PARTS = (("gate_up_proj", 0, "gate_proj"), ("gate_up_proj", 1, "up_proj"), ("down_proj", 0, "down_proj"))


def _expert_shapes(model: DecoderLM) -> Iterator[tuple[str, tuple[int, ...]]]:
    modules = {path.rsplit(".", 1)[-1]: m for path, m in expert_modules(model).items()}
    for layer in range(model.config.num_layers if modules else 0):
        for projection, _, name in _EXPERT_PARTS:
            m = modules[projection]
            yield f"model.layers.{layer}.mlp.experts.{name}.weight", (m.num_experts, m.out_features, m.in_features)


def _expert_tensors(model: DecoderLM) -> Iterator[tuple[str, np.ndarray]]:
    """The merged experts of each layer (adapters folded in), one [E, out, in] float32 tensor a part."""
    modules = {path.rsplit(".", 1)[-1]: m for path, m in expert_modules(model).items()}
    for layer in range(model.config.num_layers if modules else 0):
        weights = {projection: np.asarray(merged_weight(m, layer)) for projection, m in modules.items()}
        for projection, part, name in _EXPERT_PARTS:
            out = modules[projection].out_features
            piece = weights[projection][:, part * out : (part + 1) * out]
            yield f"model.layers.{layer}.mlp.experts.{name}.weight", piece


def _tensors(model: DecoderLM) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) of every tensor of the merged model, one at a time, plus llama.cpp's rope table."""
    yield from _rope_tables(model.config)
    yield from merged_tensors(model, jnp.float32, experts=False)
    yield from _expert_tensors(model)


_ROPE_TENSORS = {
    "rope_freqs": gguf.MODEL_TENSOR.ROPE_FREQS,
    "rope_factors_long": gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
    "rope_factors_short": gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT,
}


def _rope_tables(config: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's rotary tables: Llama 3's per-frequency divisors (`rope_freqs`), longrope's long and short
    factors (Phi3MiniModel.generate_extra_tensors)."""
    rope = config.rope
    if rope.rope_type == "llama3":
        return [("rope_freqs", rope.frequency_divisors(config.rotary_dim).astype(np.float32))]
    if rope.rope_type == "longrope":
        return [
            ("rope_factors_long", np.asarray(rope.long_factor, np.float32)),
            ("rope_factors_short", np.asarray(rope.short_factor, np.float32)),
        ]
    return []


def _encode(
    array: np.ndarray, gguf_name: str, shape: tuple[int, ...], qtype: Q, config: ModelConfig, arch: MODEL_ARCH
) -> np.ndarray:
    """One tensor in llama.cpp's layout, as the bytes (or F32 / F16 values) its storage type holds."""
    array = np.asarray(array, np.float32)
    if array.shape != shape:
        raise GGUFError(f"tensor {gguf_name!r} has shape {array.shape}, expected {shape}")
    name = gguf.MODEL_ARCH_NAMES[arch]
    heads = permuted_heads(name, gguf_name, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
    if heads is not None:
        array = to_ggml_rows(array, heads)
    if offset := norm_offset(name, gguf_name):
        array = array + np.float32(offset)
    return gguf.quants.quantize(array, qtype)


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
    if config.head_dim != config.hidden_size // config.num_heads or arch in (
        MODEL_ARCH.QWEN3,
        MODEL_ARCH.QWEN3MOE,
        *_GEMMA,
    ):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    _add_rope_scaling(writer, config, arch)
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
    if arch == MODEL_ARCH.PHI3 and config.rope.rope_type != "longrope":
        if original := config.hf_config.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(original))
    if config.moe is not None:  # Mixtral's feed_forward_length is its experts' size already
        writer.add_expert_count(config.moe.num_experts)
        writer.add_expert_used_count(config.moe.top_k)
        if arch == MODEL_ARCH.QWEN3MOE:
            writer.add_expert_feed_forward_length(config.moe.expert_size)


def _add_rope_scaling(writer: gguf.GGUFWriter, config: ModelConfig, arch: MODEL_ARCH) -> None:
    """The `rope.scaling.*` keys convert_hf_to_gguf.py writes (llama3's and longrope's tables are tensors)."""
    rope = config.rope
    if rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    elif rope.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.factor)
        writer.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings)
        # llama.cpp's defaults are transformers' (32, 1)
        if rope.beta_fast != 32.0:
            writer.add_float32(f"{writer.arch}.rope.scaling.yarn_beta_fast", rope.beta_fast)
        if rope.beta_slow != 1.0:
            writer.add_float32(f"{writer.arch}.rope.scaling.yarn_beta_slow", rope.beta_slow)
    elif rope.rope_type == "longrope":
        # llama.cpp multiplies cos and sin by this, as transformers does by its attention_scaling; it picks the long
        # factors by the context size it runs with (n_ctx > original), transformers by each call's length.
        writer.add_rope_scaling_attn_factors(rope.attention_scaling)
        writer.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings)
