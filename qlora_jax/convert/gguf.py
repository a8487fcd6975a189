"""GGUF checkpoints (llama.cpp's format) read as Hugging Face float32 tensors plus an HF `config.json` dict, and
the layout llama.cpp's converter gives a transformers checkpoint (which `gguf_export` writes back).

`gguf.GGUFReader` parses the (memory-mapped) file and `gguf.quants.dequantize` decodes every block format; the
config.json is read back from the metadata by `qlora_jax.models.config_files`. This module undoes what llama.cpp's
`convert_hf_to_gguf.py` did to the tensors:

- names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight` (explicit per-family tables keyed by
  gguf-py's `MODEL_TENSOR`, so the GGUF side of every name comes from `gguf.TENSOR_NAMES`);
- shapes: ggml lists dimensions innermost first, so a linear stored as `[in, out]` is PyTorch's `[out, in]`;
- llama (which includes Mistral): the rows of q_proj / k_proj, weights and biases, are permuted per head into
  ggml's rotary layout (`LlamaModel.permute`; `permuted_heads`, `to_ggml_rows`, `from_ggml_rows`); no other
  family here is permuted;
- gemma2 / gemma3: every RMSNorm weight is stored as `1 + w`, since HF's `Gemma*RMSNorm` computes `x * (1 + w)`
  (`norm_offset`);
- rotary tables llama.cpp computes from config.json (`rope_freqs` for Llama 3 scaling, Phi-3's `rope_factors_*`)
  go back into `config["rope_scaling"]` rather than becoming tensors.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T

from qlora_jax.convert.finite import non_finite
from qlora_jax.integrity import GGUF_CHECKSUM_KEY, check_gguf
from qlora_jax.models.config_files import (
    BLOCK_NAME,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TENSOR_TYPES,
    GGUFError,
    gguf_config,
    open_gguf,
    tensor_values,
)
from qlora_jax.models.names import LAYERS, layer_name

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "GGUFError",
    "GGUFCheckpoint",
    "read_gguf",
    "permuted_heads",
    "to_ggml_rows",
    "from_ggml_rows",
    "norm_offset",
]

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
# A mixture of experts: the router, and every expert's gate / up / down stacked [E, out, in] in one tensor each
# (gguf-py's HF side names them mlp.experts.{gate,up,down}_proj, which `convert.moe_io` reads in every family).
_MOE_BLOCK = {
    T.FFN_GATE_INP: "mlp.gate",
    T.FFN_GATE_EXP: "mlp.experts.gate_proj",
    T.FFN_UP_EXP: "mlp.experts.up_proj",
    T.FFN_DOWN_EXP: "mlp.experts.down_proj",
}
_BLOCK_NAMES = {
    "llama": {**_LLAMA_BLOCK, **_MOE_BLOCK},  # Mixtral is a llama with experts to llama.cpp
    "qwen2": _LLAMA_BLOCK,
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORM},
    "gemma2": _GEMMA_BLOCK,
    "gemma3": {**_GEMMA_BLOCK, **_QK_NORM},
    "phi3": _PHI3_BLOCK,
    "qwen3moe": {
        **{t: hf for t, hf in _LLAMA_BLOCK.items() if t not in (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)},
        **_QK_NORM,
        **_MOE_BLOCK,
    },
}
# Not weights: rotary tables computed from config.json (read back into the config) and old conversions' inv_freq.
_DERIVED = (T.ROPE_FREQS, T.ROPE_FACTORS_LONG, T.ROPE_FACTORS_SHORT, T.ATTN_ROT_EMBD)
_BLOCK_PREFIX = "blk.{bid}."
# llama.cpp's converter permutes the rotary rows of these architectures' q and k projections, per GGUF name.
_PERMUTED_ARCHITECTURES = ("llama",)
_PERMUTED_TENSORS = ("attn_q", "attn_k")
_NORM_OFFSET_ARCHITECTURES = ("gemma2", "gemma3")


def permuted_heads(arch: str, tensor: str, *, num_heads: int, num_kv_heads: int) -> int | None:
    """The head count whose rotary rows llama.cpp permutes in GGUF tensor `tensor` (`blk.3.attn_q.weight` or its
    bias) of architecture `arch`, or None if that tensor is stored as transformers stores it."""
    kind = tensor.rsplit(".", 2)[-2] if tensor.count(".") >= 2 else ""
    if arch not in _PERMUTED_ARCHITECTURES or kind not in _PERMUTED_TENSORS:
        return None
    return num_heads if kind == "attn_q" else num_kv_heads


def to_ggml_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` on the rows [heads * head_dim, ...]: each head's two rotary halves
    (transformers' rotate_half layout) become interleaved (even, odd) pairs (ggml's). Raises GGUFError unless the
    rows are whole rotary pairs of `heads` heads."""
    rows = _rotary_rows(array, heads)
    return array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def from_ggml_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `to_ggml_rows`: `reshape(heads, rows // heads // 2, 2, ...).swapaxes(1, 2)` on the rows."""
    rows = _rotary_rows(array, heads)
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _rotary_rows(array: np.ndarray, heads: int) -> int:
    rows = array.shape[0]
    if rows % (2 * heads):
        raise GGUFError(f"{rows} rows are not a whole number of rotary pairs for {heads} heads")
    return rows


def norm_offset(arch: str, tensor: str) -> float:
    """What llama.cpp adds to GGUF tensor `tensor`'s stored values: 1 for the RMSNorm weights of Gemma 2/3 (HF's
    Gemma RMSNorm scales by 1 + w, llama.cpp's by the stored weight), else 0."""
    return 1.0 if arch in _NORM_OFFSET_ARCHITECTURES and tensor.endswith("norm.weight") else 0.0


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

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The HF-layout shape the file's header gives `hf_name` (nothing is read or decoded)."""
        source = self._sources.get(hf_name)
        if source is None:
            raise GGUFError(f"{self.path}: no tensor {hf_name!r} in this {self.architecture} checkpoint")
        return tuple(int(d) for d in reversed(source.tensor.shape))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors as (HF name, array), decoded one at a time."""
        for name in self.tensor_names:
            yield name, self.tensor(name)


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Open a GGUF file and check that every tensor maps to a Hugging Face name and a supported type (and, for a
    file we exported, that its tensor data still has the SHA-256 it was written with: IntegrityError otherwise)."""
    path = pathlib.Path(path)
    reader = open_gguf(path)
    field = reader.fields.get(GGUF_CHECKSUM_KEY)  # written by our exports: verified before any tensor is used
    check_gguf(path, None if field is None else str(field.contents()), reader.data_offset)
    arch, config = gguf_config(reader, path)
    sources = _sources(arch, {t.name: t for t in reader.tensors}, config, path)
    return GGUFCheckpoint(path, arch, config, tuple(sources), sources)


def _sources(
    arch: str, tensors: Mapping[str, gguf.ReaderTensor], config: dict[str, Any], path: pathlib.Path
) -> dict[str, _Source]:
    """HF name -> where and how to decode it, in file order; every tensor must map and have a supported type."""
    flat, per_block = _gguf_names({**_GLOBAL_NAMES, **dict.fromkeys(_DERIVED), **_BLOCK_NAMES[arch]})
    heads = dict(num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"])
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
            sources[f"{hf_base}.{kind}"] = _Source(tensor, permuted_heads(arch, name, **heads), norm_offset(arch, name))
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
    if (match := BLOCK_NAME.fullmatch(base)) and int(match[1]) < n_layers:
        hf = per_block[match[2]]
        return None if hf is None else layer_name(f"{LAYERS}.{hf}", int(match[1]))
    return flat[base]


def _load(source: _Source, path: pathlib.Path) -> np.ndarray:
    array = tensor_values(source.tensor, path)
    if problem := non_finite(array):
        raise GGUFError(f"{path}: tensor {source.tensor.name!r} {problem}")
    if source.heads is not None:
        try:
            array = from_ggml_rows(array, source.heads)
        except GGUFError as e:
            raise GGUFError(f"{path}: tensor {source.tensor.name!r}: {e}") from None
    if source.norm_offset:
        array -= np.float32(source.norm_offset)
    return array
