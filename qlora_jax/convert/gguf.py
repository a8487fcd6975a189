"""GGUF checkpoints (llama.cpp's format) read as Hugging Face float32 tensors plus an HF `config.json` dict.

`gguf.GGUFReader` parses the (memory-mapped) file and `gguf.quants.dequantize` decodes every block format; this
module only undoes what llama.cpp's `convert_hf_to_gguf.py` did to the Hugging Face checkpoint:

- names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight` (explicit per-family tables keyed by
  gguf-py's `MODEL_TENSOR`, so the GGUF side of every name comes from `gguf.TENSOR_NAMES`);
- shapes: ggml lists dimensions innermost first, so a linear stored as `[in, out]` is PyTorch's `[out, in]`;
- llama (which includes Mistral): the rows of q_proj / k_proj, weights and biases, are permuted per head into
  ggml's rotary layout (`LlamaModel.permute`); no other family here is permuted;
- gemma2 / gemma3: every RMSNorm weight is stored as `1 + w`, since HF's `Gemma*RMSNorm` computes `x * (1 + w)`;
- rotary tables llama.cpp computes from config.json (`rope_freqs` for Llama 3 scaling, Phi-3's `rope_factors_*`)
  go back into `config["rope_scaling"]` rather than becoming tensors.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import Keys

from qlora_jax.convert.finite import non_finite
from qlora_jax.errors import InputError

__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_TENSOR_TYPES", "GGUFError", "GGUFCheckpoint", "read_gguf"]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# Every weight format gguf.quants (>= 0.17) dequantizes; F64 and the integer types never hold weights.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    *("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"),
)

_MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),  # GGUF holds only the text model of Gemma 3
    "phi3": ("phi3", "Phi3ForCausalLM"),
}

_GLOBAL_NAMES = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head"}
_LLAMA_BLOCK = {
    T.ATTN_NORM: "input_layernorm",
    T.ATTN_Q: "self_attn.q_proj",
    T.ATTN_K: "self_attn.k_proj",
    T.ATTN_V: "self_attn.v_proj",
    T.ATTN_OUT: "self_attn.o_proj",
    T.FFN_NORM: "post_attention_layernorm",
    T.FFN_GATE: "mlp.gate_proj",
    T.FFN_UP: "mlp.up_proj",
    T.FFN_DOWN: "mlp.down_proj",
}
_QK_NORM = {T.ATTN_Q_NORM: "self_attn.q_norm", T.ATTN_K_NORM: "self_attn.k_norm"}
# Gemma 2/3 have four norms per block; gguf-py calls the pre-feedforward one FFN_PRE_NORM, but it is stored under
# llama's `ffn_norm` name, which is HF's post_attention_layernorm everywhere else.
_GEMMA_BLOCK = {
    **{t: hf for t, hf in _LLAMA_BLOCK.items() if t != T.FFN_NORM},
    T.ATTN_POST_NORM: "post_attention_layernorm",
    T.FFN_PRE_NORM: "pre_feedforward_layernorm",
    T.FFN_POST_NORM: "post_feedforward_layernorm",
}
# Phi-3 keeps HF's fused projections as they are: qkv_proj rows are [q; k; v], gate_up_proj rows [gate; up].
_PHI3_BLOCK = {
    T.ATTN_NORM: "input_layernorm",
    T.ATTN_QKV: "self_attn.qkv_proj",
    T.ATTN_OUT: "self_attn.o_proj",
    T.FFN_NORM: "post_attention_layernorm",
    T.FFN_UP: "mlp.gate_up_proj",
    T.FFN_DOWN: "mlp.down_proj",
}
_BLOCK_NAMES = {
    "llama": _LLAMA_BLOCK,
    "qwen2": _LLAMA_BLOCK,
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORM},
    "gemma2": _GEMMA_BLOCK,
    "gemma3": {**_GEMMA_BLOCK, **_QK_NORM},
    "phi3": _PHI3_BLOCK,
}
# Not weights: rotary tables computed from config.json (read back into the config) and old conversions' inv_freq.
_DERIVED = (T.ROPE_FREQS, T.ROPE_FACTORS_LONG, T.ROPE_FACTORS_SHORT, T.ATTN_ROT_EMBD)
_BLOCK_PREFIX = "blk.{bid}."
_BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")
_PERMUTED_ARCHITECTURES = ("llama",)
_NORM_OFFSET_ARCHITECTURES = ("gemma2", "gemma3")
# llama.cpp scales Gemma attention by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim) for the 27B models only,
# which it recognises by their layer count (HF's query_pre_attn_scalar says the same).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Meta's Llama 3.x (low_freq_factor, high_freq_factor, original_max_position_embeddings); llama.cpp's converter
# assumes the last one whatever config.json's rope_scaling says.
_LLAMA3_ROPE_DEFAULTS = (1.0, 4.0, 8192)
# Keys newer than gguf 0.17's `Keys` tables.
_FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"
_YARN_KEYS = {
    "{arch}.rope.scaling.yarn_beta_fast": "beta_fast",
    "{arch}.rope.scaling.yarn_beta_slow": "beta_slow",
    "{arch}.rope.scaling.yarn_attn_factor": "attention_factor",
}


class GGUFError(InputError):
    """A GGUF file that is unreadable, malformed, or holds a model this module cannot convert."""


@dataclasses.dataclass(frozen=True)
class _Source:
    tensor: gguf.ReaderTensor
    heads: int | None = None  # undo llama.cpp's rotary row permutation with this many heads
    norm_offset: float = 0.0  # gemma stores RMSNorm weights as norm_offset + w


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file's weights under Hugging Face names, dequantized on demand from the memory-mapped file."""

    path: pathlib.Path
    architecture: str
    config: dict[str, Any]
    tensor_names: tuple[str, ...] = dataclasses.field(repr=False)
    _sources: Mapping[str, _Source] = dataclasses.field(repr=False, compare=False)

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor as a new float32 array in HF layout (PyTorch `[out_features, in_features]` for linears)."""
        source = self._sources.get(hf_name)
        if source is None:
            raise GGUFError(f"{self.path}: no tensor {hf_name!r} in this {self.architecture} checkpoint")
        return _load(source, self.path)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors as (HF name, array), decoded one at a time."""
        for name in self.tensor_names:
            yield name, self.tensor(name)


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Open a GGUF file and check that every tensor maps to a Hugging Face name and a supported type."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path, arch="")
    if (split_count := meta.get(Keys.Split.LLM_KV_SPLIT_COUNT, int)) not in (None, 0, 1):
        raise GGUFError(f"{path}: one of {split_count} split files; merge them first (llama-gguf-split --merge)")
    arch = meta.require(Keys.General.ARCHITECTURE, str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    meta = _Metadata(reader, path, arch)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(arch, meta, tensors, path)
    sources = _sources(arch, tensors, config, path)
    return GGUFCheckpoint(path, arch, config, tuple(sources), sources)


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e}") from e
    # GGUFReader checks the magic and version, and otherwise fails with whatever numpy raises when a length or an
    # offset runs past the end of the file or a value is out of range.
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        raise GGUFError(f"{path}: not a GGUF file, or truncated or corrupt: {e}") from e
    if reader.byte_order != "I":  # the reader swaps metadata, but gguf.quants would decode swapped tensor bytes
        raise GGUFError(f"{path}: GGUF file of the other byte order than this machine's")
    return reader


class _Metadata:
    """Typed access to a file's key/value fields; `{arch}` in a key stands for the file's architecture."""

    def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path, arch: str) -> None:
        self._fields, self._path, self._arch = reader.fields, path, arch

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        key = key.format(arch=self._arch)
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except (ValueError, IndexError) as e:  # e.g. a string that is not UTF-8
            raise GGUFError(f"{self._path}: metadata field {key!r} is corrupt: {e}") from e
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            # The shortest decimal that rounds to the stored float32 is what config.json held (1e-05, not 9.99e-06).
            return float(str(np.float32(value))) if field.types[0] == gguf.GGUFValueType.FLOAT32 else float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise GGUFError(f"{self._path}: metadata field {key!r} holds {value!r}, expected {kind.__name__}")
        return value

    def require(self, key: str, kind: type) -> Any:
        value = self.get(key, kind)
        if value is None:
            raise GGUFError(f"{self._path}: missing metadata field {key.format(arch=self._arch)!r}")
        return value


def _config(arch: str, meta: _Metadata, tensors: Mapping[str, gguf.ReaderTensor], path: pathlib.Path) -> dict[str, Any]:
    """What config.json would hold: the keys transformers' configs take (legacy `rope_theta` / `rope_scaling` ones,
    which transformers 5 still accepts)."""
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{path}: no tensor 'token_embd.weight'")
    hidden = meta.require(Keys.LLM.EMBEDDING_LENGTH, int)
    heads = meta.require(Keys.Attention.HEAD_COUNT, int)
    if heads <= 0:
        raise GGUFError(f"{path}: {Keys.Attention.HEAD_COUNT.format(arch=arch)!r} is {heads}")
    model_type, hf_class = _MODEL_TYPES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.require(Keys.LLM.FEED_FORWARD_LENGTH, int),
        "num_hidden_layers": _block_count(meta, tensors, path),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(Keys.Attention.HEAD_COUNT_KV, int, heads),
        "head_dim": _head_dim(arch, meta, hidden // heads),
        "rms_norm_eps": meta.require(Keys.Attention.LAYERNORM_RMS_EPS, float),
        "rope_theta": meta.get(Keys.Rope.FREQ_BASE, float, 10000.0),  # llama.cpp's default too
        "max_position_embeddings": meta.require(Keys.LLM.CONTEXT_LENGTH, int),
        # The embedding's rows, not {arch}.vocab_size or the tokenizer's length: Gemma 3 conversions drop unused rows.
        "vocab_size": int(embed.shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get(Keys.Tokenizer.BOS_ID, int),
        "eos_token_id": meta.get(Keys.Tokenizer.EOS_ID, int),
        # None rather than a family default, which may lie outside this vocabulary (Phi-3's is 32000)
        "pad_token_id": meta.get(Keys.Tokenizer.PAD_ID, int),
    }
    if min(config["num_key_value_heads"], config["head_dim"]) <= 0:
        raise GGUFError(f"{path}: {config['num_key_value_heads']} key/value heads of size {config['head_dim']}")
    config.update(_FAMILY_CONFIG[arch](arch, meta, tensors, config))
    if (rope_scaling := _rope_scaling(arch, meta, tensors, config, path)) is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _block_count(meta: _Metadata, tensors: Mapping[str, gguf.ReaderTensor], path: pathlib.Path) -> int:
    """block_count, checked against the blocks the tensors fill (a truncated or mis-merged file would not)."""
    n_layers = meta.require(Keys.LLM.BLOCK_COUNT, int)
    blocks = {int(match[1]) for name in tensors if (match := _BLOCK_NAME.match(name))}
    if len(blocks) != n_layers or max(blocks, default=-1) != n_layers - 1:
        raise GGUFError(
            f"{path}: block_count is {n_layers}, but tensors fill {len(blocks)} blocks numbered up to "
            f"{max(blocks, default=None)}"
        )
    return n_layers


def _head_dim(arch: str, meta: _Metadata, default: int) -> int:
    # key_length is written whenever config.json has head_dim (gemma, qwen3); llama always writes its rotary
    # dimension, which is its head size; Phi-3's rotary dimension may be partial.
    if (key_length := meta.get(Keys.Attention.KEY_LENGTH, int)) is not None:
        return key_length
    if arch == "llama":
        return meta.get(Keys.Rope.DIMENSION_COUNT, int, default)
    return default


def _llama_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}


def _no_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {}


def _gemma_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    n_layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    extra = {
        "hidden_activation": "gelu_pytorch_tanh",  # every Gemma 2/3; GGUF does not store it
        "sliding_window": meta.get(Keys.Attention.SLIDING_WINDOW, int),
        "final_logit_softcapping": meta.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float),
        "query_pre_attn_scalar": hidden // heads if n_layers == _GEMMA_27B_LAYERS[arch] else config["head_dim"],
    }
    if arch == "gemma2":
        extra["attn_logit_softcapping"] = meta.get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, float)
    else:
        extra["rope_local_base_freq"] = meta.get(_FREQ_BASE_SWA, float, 10000.0)
        if not extra["sliding_window"]:  # llama.cpp then attends globally in every layer
            extra["sliding_window"] = None
            extra["layer_types"] = ["full_attention"] * n_layers
    return extra


def _phi3_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    # A sliding window of 0 is how the converter marks Phi-4, which has none.
    extra: dict[str, Any] = {"sliding_window": meta.get(Keys.Attention.SLIDING_WINDOW, int) or None}
    if (original := meta.get(Keys.Rope.SCALING_ORIG_CTX_LEN, int)) is not None:
        extra["original_max_position_embeddings"] = original
    rope_dim = meta.get(Keys.Rope.DIMENSION_COUNT, int, config["head_dim"])
    if rope_dim != config["head_dim"]:
        extra["partial_rotary_factor"] = rope_dim / config["head_dim"]
    return extra


_FAMILY_CONFIG: dict[str, Callable[[str, _Metadata, Mapping[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama_config,
    "qwen2": _no_config,
    "qwen3": _no_config,
    "gemma2": _gemma_config,
    "gemma3": _gemma_config,
    "phi3": _phi3_config,
}


def _rope_scaling(
    arch: str, meta: _Metadata, tensors: Mapping[str, gguf.ReaderTensor], config: dict[str, Any], path: pathlib.Path
) -> dict[str, Any] | None:
    def table(name: str) -> np.ndarray | None:
        return None if name not in tensors else _load(_Source(tensors[name]), path)

    if arch == "phi3":
        long, short = table("rope_factors_long.weight"), table("rope_factors_short.weight")
        if long is None or short is None:
            if long is not None or short is not None:
                raise GGUFError(f"{path}: only one of rope_factors_long.weight and rope_factors_short.weight")
            return None
        return {"rope_type": "longrope", "long_factor": _decimals(long), "short_factor": _decimals(short)}
    if (divisors := table("rope_freqs.weight")) is not None:
        return _llama3_rope_scaling(divisors, config["rope_theta"], config["head_dim"], path)
    kind = meta.get(Keys.Rope.SCALING_TYPE, str)
    if kind in (None, "none"):
        return None
    factor = meta.require(Keys.Rope.SCALING_FACTOR, float)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        scaling["original_max_position_embeddings"] = meta.require(Keys.Rope.SCALING_ORIG_CTX_LEN, int)
        scaling.update({hf: v for key, hf in _YARN_KEYS.items() if (v := meta.get(key, float)) is not None})
        return scaling
    raise GGUFError(f"{path}: unsupported rope scaling type {kind!r} in {Keys.Rope.SCALING_TYPE.format(arch=arch)!r}")


def _llama3_rope_scaling(
    divisors: np.ndarray, theta: float, head_dim: int, path: pathlib.Path
) -> dict[str, Any] | None:
    """HF's `llama3` rope_scaling, recovered from the per-frequency divisors llama.cpp stores as `rope_freqs`.

    A divisor is 1 for wavelengths below L / high_freq_factor, `factor` above L / low_freq_factor, and in between
    1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low), linear in 1 / wavelength. HF uses
    only the ratios of (L, low, high), so L is pinned to llama.cpp's 8192 and low, high fitted on that band.
    """
    divisors = divisors.astype(np.float64)
    wavelengths = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    if divisors.shape != wavelengths.shape:
        raise GGUFError(
            f"{path}: rope_freqs.weight has {divisors.size} entries, head_dim {head_dim} needs {head_dim // 2}"
        )
    factor = float(str(np.float32(divisors.max())))
    if factor <= 1.0:
        return None
    low, high, context = _LLAMA3_ROPE_DEFAULTS
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if band.sum() >= 2:
        s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelengths[band], s, 1)  # slope = L / (high - low), intercept = -low / ...
        low, high = float(f"{-intercept * context / slope:.6g}"), float(f"{(1 - intercept) * context / slope:.6g}")
    smooth = (context / wavelengths - low) / (high - low)
    expected = np.where(
        wavelengths < context / high,
        1.0,
        np.where(wavelengths > context / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if not np.allclose(expected, divisors, rtol=1e-4):
        raise GGUFError(f"{path}: rope_freqs.weight does not follow Llama 3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }


def _decimals(values: np.ndarray) -> list[float]:
    return [float(str(np.float32(v))) for v in values]


def _sources(
    arch: str, tensors: Mapping[str, gguf.ReaderTensor], config: dict[str, Any], path: pathlib.Path
) -> dict[str, _Source]:
    """HF name -> where and how to decode it, in file order; every tensor must map and have a supported type."""
    flat, per_block = _gguf_names({**_GLOBAL_NAMES, **dict.fromkeys(_DERIVED), **_BLOCK_NAMES[arch]})
    heads = {}
    if arch in _PERMUTED_ARCHITECTURES:
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    offset = 1.0 if arch in _NORM_OFFSET_ARCHITECTURES else 0.0
    sources = {}
    for name, tensor in tensors.items():
        base, _, kind = name.rpartition(".")
        try:
            if kind not in ("weight", "bias"):
                raise KeyError(kind)
            hf_base = _hf_base(base, flat, per_block, config["num_hidden_layers"])
        except KeyError:
            raise GGUFError(f"{path}: cannot map tensor {name!r} of a {arch} model to a Hugging Face name") from None
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has unsupported type {tensor.tensor_type.name}")
        if hf_base is not None:
            norm_offset = offset if name.endswith("norm.weight") else 0.0  # llama.cpp's own test for gemma norms
            sources[f"{hf_base}.{kind}"] = _Source(tensor, heads.get(base.rpartition(".")[2]), norm_offset)
    return sources


def _gguf_names(table: Mapping[T, str | None]) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """{MODEL_TENSOR: HF name} as GGUF names of whole-model tensors, and of block tensors after their `blk.N.`."""
    flat, per_block = {}, {}
    for t, hf in table.items():
        name = gguf.TENSOR_NAMES[t]
        if name.startswith(_BLOCK_PREFIX):
            per_block[name.removeprefix(_BLOCK_PREFIX)] = hf
        else:
            flat[name] = hf
    return flat, per_block


def _hf_base(
    base: str, flat: Mapping[str, str | None], per_block: Mapping[str, str | None], n_layers: int
) -> str | None:
    """The HF name of a GGUF name (both without `.weight` / `.bias`), None for tensors that are no weights; KeyError
    for names the architecture does not have."""
    if (match := _BLOCK_NAME.fullmatch(base)) and int(match[1]) < n_layers:
        hf = per_block[match[2]]
        return None if hf is None else f"model.layers.{match[1]}.{hf}"
    return flat[base]


def _load(source: _Source, path: pathlib.Path) -> np.ndarray:
    tensor = source.tensor
    if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}")
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the innermost dimension first
    try:
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    except (ValueError, TypeError, IndexError, ArithmeticError) as e:  # data that does not fit its type and shape
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}, {shape}) cannot be decoded: {e}"
        ) from e
    if problem := non_finite(array):
        raise GGUFError(f"{path}: tensor {tensor.name!r} {problem}")
    if np.may_share_memory(array, tensor.data):  # F32 comes back as a view of the read-only memory map
        array = array.copy()
    if source.heads is not None:
        array = _unpermute(array, source.heads, tensor.name, path)
    if source.norm_offset:
        array -= np.float32(source.norm_offset)
    return array


def _unpermute(array: np.ndarray, heads: int, name: str, path: pathlib.Path) -> np.ndarray:
    """Inverse of llama.cpp's `reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)` on the rows."""
    rows = array.shape[0]
    if rows % (2 * heads):
        raise GGUFError(
            f"{path}: tensor {name!r} has {rows} rows, not a whole number of rotary pairs for {heads} heads"
        )
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
