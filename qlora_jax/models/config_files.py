"""A model's configuration from its files, without reading any weights: the config.json of a transformers model
directory, or the metadata of a GGUF file (llama.cpp's format) read back as the config.json it was converted from.

`gguf.GGUFReader` parses the (memory-mapped) file; this module undoes what llama.cpp's `convert_hf_to_gguf.py` did
to config.json: `{arch}.*` keys back to transformers' names (legacy `rope_theta` / `rope_scaling` ones, which
transformers 5 still accepts), and the rotary tables it computes from config.json (`rope_freqs` for Llama 3
scaling, Phi-3's `rope_factors_*`) back into `rope_scaling`. The tensors themselves are `qlora_jax.convert.gguf`'s.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import gguf
import numpy as np
from gguf import Keys

from qlora_jax.errors import InputError
from qlora_jax.models.config import ConfigError, ModelConfig, RopeConfig

__all__ = [
    "GGUFError",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "MODEL_TYPES",
    "GEMMA_27B_LAYERS",
    "BLOCK_NAME",
    "read_model_config",
    "is_gguf",
    "open_gguf",
    "gguf_config",
    "tensor_values",
]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3moe")
# Every weight format gguf.quants (>= 0.17) dequantizes; F64 and the integer types never hold weights.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    *("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"),
)
# llama.cpp architecture -> (transformers model_type, architectures[0])
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),  # GGUF holds only the text model of Gemma 3
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# llama.cpp writes Mixtral as a llama with experts ({arch}.expert_count); its transformers model_type:
MIXTRAL = ("mixtral", "MixtralForCausalLM")
# llama.cpp scales Gemma attention by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim) for the 27B models only,
# which it recognises by their layer count (HF's query_pre_attn_scalar says the same).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# A tensor of block N: `blk.N.<name>`.
BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")
# Meta's Llama 3.x (low_freq_factor, high_freq_factor, original_max_position_embeddings); llama.cpp's converter
# assumes the last one whatever config.json's rope_scaling says.
_LLAMA3_ROPE_DEFAULTS = (1.0, 4.0, 8192)
_PHI3_ORIGINAL_CONTEXT = 4096  # Phi3Config's default original_max_position_embeddings
# Keys newer than gguf 0.17's `Keys` tables.
_FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"
_YARN_KEYS = {
    "{arch}.rope.scaling.yarn_beta_fast": "beta_fast",
    "{arch}.rope.scaling.yarn_beta_slow": "beta_slow",
    "{arch}.rope.scaling.yarn_attn_factor": "attention_factor",
}


class GGUFError(InputError):
    """A GGUF file that is unreadable, malformed, or holds a model this package cannot convert."""


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a transformers model directory (its config.json), a config.json file, or a GGUF file (its
    metadata), without reading any weights.

    Raises ConfigError for a path that is none of these or a malformed config.json, UnsupportedModelError for a
    family (or feature) the decoder does not implement, GGUFError for a GGUF file that cannot be read.

    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = (pathlib.Path(directory) / "config.json").write_text(json.dumps(dict(model_type="qwen2",
    ...         vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)))
    ...     config = read_model_config(directory)
    >>> config.model_type, config.num_layers, config.qkv_bias
    ('qwen2', 2, True)
    """
    path = pathlib.Path(path)
    if is_gguf(path):
        return ModelConfig.from_hf_config(gguf_config(open_gguf(path), path)[1], source=str(path))
    if path.is_dir():
        path = path / "config.json"
    if path.name != "config.json" or not path.is_file():
        raise ConfigError(f"{path}: not a model directory with a config.json, nor a .gguf file")
    return ModelConfig.from_file(path)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file: a `.gguf` name, or a file that starts with the GGUF magic."""
    path = pathlib.Path(path)
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class _BoundedGGUFReader(gguf.GGUFReader):
    """gguf's reader, refusing a read that runs past the end of the file.

    gguf's own `_get` returns a shorter (often empty) array there, and a metadata array that claims 2^40 elements
    of a scalar type then loops 2^40 times over nothing: a corrupt 743-byte file kept it busy for minutes (found by
    tests/test_fuzz_readers.py). Raises ValueError instead, which `open_gguf` reports as a corrupt file.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if int(offset) + np.dtype(dtype).itemsize * int(count) > len(self.data):
            raise ValueError(
                f"{int(count)} value(s) of {np.dtype(dtype)} at byte {int(offset)} run past the end of the file "
                f"({len(self.data)} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A memory-mapped GGUFReader of `path`; GGUFError naming the file if it cannot be read, is truncated, or is
    corrupt (any value that runs past the end of the file included)."""
    path = pathlib.Path(path)
    try:
        reader = _BoundedGGUFReader(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e}") from e
    # GGUFReader checks the magic and version, and otherwise fails with whatever numpy raises when a length or an
    # offset runs past the end of the file or a value is out of range.
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        raise GGUFError(f"{path}: not a GGUF file, or truncated or corrupt: {e}") from e
    if reader.byte_order != "I":  # the reader swaps metadata, but gguf.quants would decode swapped tensor bytes
        raise GGUFError(f"{path}: GGUF file of the other byte order than this machine's")
    return reader


def gguf_config(reader: gguf.GGUFReader, path: pathlib.Path) -> tuple[str, dict[str, Any]]:
    """(llama.cpp architecture, the config.json dict) of an open GGUF file, after checking that it is one whole
    file of a supported architecture with every metadata field the config needs."""
    meta = _Metadata(reader, path, arch="")
    if (split_count := meta.get(Keys.Split.LLM_KV_SPLIT_COUNT, int)) not in (None, 0, 1):
        raise GGUFError(f"{path}: one of {split_count} split files; merge them first (llama-gguf-split --merge)")
    arch = meta.require(Keys.General.ARCHITECTURE, str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    return arch, _config(arch, _Metadata(reader, path, arch), tensors, path)


def tensor_values(tensor: gguf.ReaderTensor, path: pathlib.Path) -> np.ndarray:
    """One tensor's values as a new float32 array in PyTorch's dimension order (ggml lists the innermost first)."""
    if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    except (ValueError, TypeError, IndexError, ArithmeticError) as e:  # data that does not fit its type and shape
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}, {shape}) cannot be decoded: {e}"
        ) from e
    if np.may_share_memory(array, tensor.data):  # F32 comes back as a view of the read-only memory map
        array = array.copy()
    return array


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
    model_type, hf_class = MODEL_TYPES[arch]
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
    blocks = {int(match[1]) for name in tensors if (match := BLOCK_NAME.match(name))}
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
    if meta.get(Keys.LLM.EXPERT_COUNT, int):  # Mixtral: a llama with experts (feed_forward_length: each expert's)
        return {"model_type": MIXTRAL[0], "architectures": [MIXTRAL[1]], **_expert_config(meta, "num_local_experts")}
    return {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}


def _expert_config(meta: _Metadata, count_key: str) -> dict[str, Any]:
    return {
        count_key: meta.require(Keys.LLM.EXPERT_COUNT, int),
        "num_experts_per_tok": meta.require(Keys.LLM.EXPERT_USED_COUNT, int),
    }


def _qwen3moe_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp's qwen3moe graph always renormalizes the top-k routing weights (src/models/qwen3moe.cpp)
    return {
        **_expert_config(meta, "num_experts"),
        "norm_topk_prob": True,
        "moe_intermediate_size": meta.require(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int),
    }


def _no_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {}


def _gemma_config(arch: str, meta: _Metadata, tensors: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    n_layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    extra = {
        "hidden_activation": "gelu_pytorch_tanh",  # every Gemma 2/3; GGUF does not store it
        "sliding_window": meta.get(Keys.Attention.SLIDING_WINDOW, int),
        "final_logit_softcapping": meta.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float),
        "query_pre_attn_scalar": hidden // heads if n_layers == GEMMA_27B_LAYERS[arch] else config["head_dim"],
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
    "qwen3moe": _qwen3moe_config,
}


def _rope_scaling(
    arch: str, meta: _Metadata, tensors: Mapping[str, gguf.ReaderTensor], config: dict[str, Any], path: pathlib.Path
) -> dict[str, Any] | None:
    def table(name: str) -> np.ndarray | None:
        return None if name not in tensors else tensor_values(tensors[name], path)

    if arch == "phi3":
        long, short = table("rope_factors_long.weight"), table("rope_factors_short.weight")
        if long is None or short is None:
            if long is not None or short is not None:
                raise GGUFError(f"{path}: only one of rope_factors_long.weight and rope_factors_short.weight")
            return None
        scaling = {"rope_type": "longrope", "long_factor": _decimals(long), "short_factor": _decimals(short)}
        # The converter writes transformers' attention scaling; config.json needs it only where it is not the one
        # derived from the two lengths (a `factor` or `attention_factor` of its own).
        if (attention_factor := meta.get(Keys.Rope.SCALING_ATTN_FACTOR, float)) is not None:
            original = config.get("original_max_position_embeddings", _PHI3_ORIGINAL_CONTEXT)
            derived = RopeConfig(
                theta=config["rope_theta"],
                rope_type="longrope",
                original_max_position_embeddings=original,
                factor=config["max_position_embeddings"] / original,
            ).attention_scaling
            if not np.isclose(attention_factor, derived, rtol=1e-6):
                scaling["attention_factor"] = attention_factor
        return scaling
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
    """HF's `llama3` rope_scaling, recovered from the per-frequency divisors llama.cpp stores as `rope_freqs`
    (`RopeConfig.frequency_divisors`).

    A divisor is 1 for wavelengths below L / high_freq_factor, `factor` above L / low_freq_factor, and in between
    1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low), linear in 1 / wavelength. HF uses
    only the ratios of (L, low, high), so L is pinned to llama.cpp's 8192 and low, high fitted on that band.
    """
    divisors = divisors.astype(np.float64)
    wavelengths = RopeConfig(theta=theta).wavelengths(head_dim)
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
    rope = RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=context,
    )
    if not np.allclose(rope.frequency_divisors(head_dim), divisors, rtol=1e-4):
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
