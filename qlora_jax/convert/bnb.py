"""bitsandbytes 4-bit tensors in state dicts, as transformers saves and loads a `load_in_4bit` model.

A 4-bit linear `model.layers.0.mlp.up_proj` is stored under the keys
`<prefix>.weight` (uint8[n/2, 1] packed codes), `.weight.absmax`, `.weight.quant_map`, and with double
quantization `.weight.nested_absmax` and `.weight.nested_quant_map`, plus `.weight.quant_state.bitsandbytes__nf4`
(or `__fp4`): a uint8 tensor holding a JSON object with quant_type, blocksize, dtype, shape and the nested fields.
Arrays here are numpy (what safetensors reads and writes); no torch is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from qlora_jax import codebooks
from qlora_jax.convert.finite import non_finite
from qlora_jax.errors import InputError
from qlora_jax.quant import SUPPORTED_BLOCKSIZES, SUPPORTED_DTYPES, QuantConfig, QuantizedTensor

__all__ = [
    "BnbFormatError",
    "to_state_dict",
    "from_state_dict",
    "quantized_weight_prefixes",
    "split_state_dict",
    "merge_state_dict",
    "quantization_config",
    "stored_quant_config",
    "DEFAULT_SKIP_MODULES",
]

_QUANT_STATE = ".quant_state.bitsandbytes__"


class BnbFormatError(InputError):
    """A bitsandbytes 4-bit entry of a state dict is missing, malformed or inconsistent."""


def to_state_dict(qt: QuantizedTensor, key: str = "weight") -> dict[str, np.ndarray]:
    """The entries bitsandbytes' `Linear4bit` writes for its weight, `key` being the weight's full name."""
    if qt.quant_type not in codebooks.BNB_QUANT_TYPES:
        raise ValueError(f"{key}: bitsandbytes cannot store quant_type {qt.quant_type!r}")
    if len(qt.packed.shape) != 1:
        raise ValueError(f"{key}: cannot write a stacked QuantizedTensor (packed shape {qt.packed.shape})")
    meta: dict[str, Any] = {
        "quant_type": qt.quant_type,
        "blocksize": qt.blocksize,
        "dtype": jnp.dtype(qt.dtype).name,
        "shape": list(qt.shape),
    }
    out = {
        key: np.asarray(qt.packed).reshape(-1, 1),
        f"{key}.absmax": np.asarray(qt.absmax),
        f"{key}.quant_map": codebooks.code_table(qt.quant_type).copy(),
    }
    if qt.double_quant:
        out[f"{key}.nested_absmax"] = np.asarray(qt.nested_absmax)
        out[f"{key}.nested_quant_map"] = codebooks.DYNAMIC_CODE.copy()
        meta.update(
            nested_blocksize=qt.dq_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.float32(qt.offset)),
        )
    out[f"{key}{_QUANT_STATE}{qt.quant_type}"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return out


def _quant_state_key(tensors: Mapping[str, Any], key: str) -> str:
    found = [k for k in (f"{key}{_QUANT_STATE}{t}" for t in codebooks.BNB_QUANT_TYPES) if k in tensors]
    if len(found) != 1:
        raise BnbFormatError(f"{key}: expected exactly one of '{key}{_QUANT_STATE}nf4' / '...fp4', found {len(found)}")
    return found[0]


def _require(tensors: Mapping[str, Any], key: str, dtype: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    if key not in tensors:
        raise BnbFormatError(f"{key}: missing from the checkpoint")
    array = np.asarray(tensors[key])
    if array.dtype != np.dtype(dtype):
        raise BnbFormatError(f"{key}: expected dtype {np.dtype(dtype).name}, found {array.dtype.name}")
    if shape is not None and math.prod(array.shape) != math.prod(shape):
        raise BnbFormatError(f"{key}: expected {math.prod(shape)} values {shape}, found shape {array.shape}")
    return array.reshape(shape) if shape is not None else array


def _packed_bytes(tensors: Mapping[str, Any], key: str, nbytes: int) -> np.ndarray:
    """The packed codes as uint8[nbytes]. bitsandbytes stores them in `bnb_4bit_quant_storage`'s dtype (uint8 by
    default; bfloat16, float16, float32, float64, int8, ... for FSDP-QLoRA) by reinterpreting the bytes
    (`packed.view(quant_storage)`), so they are read back by the same reinterpretation, never converted: their
    "values" in a float storage are arbitrary bit patterns (NaN among them), not numbers."""
    if key not in tensors:
        raise BnbFormatError(f"{key}: missing from the checkpoint")
    array = np.ascontiguousarray(tensors[key])
    if array.dtype.kind not in "iufV" and array.dtype.name != "bfloat16":
        raise BnbFormatError(f"{key}: packed 4-bit codes stored as {array.dtype.name}, not a numeric storage dtype")
    raw = array.reshape(-1).view(np.uint8)
    if raw.size != nbytes:
        raise BnbFormatError(
            f"{key}: expected {nbytes} bytes of packed codes, found {raw.size} ({array.dtype.name}{list(array.shape)})"
        )
    return raw


def _finite(array: np.ndarray, key: str) -> np.ndarray:
    if problem := non_finite(array):
        raise BnbFormatError(f"{key}: {problem}")
    return array


def from_state_dict(tensors: Mapping[str, Any], key: str = "weight") -> QuantizedTensor:
    """Reads the 4-bit weight `key` (and its `key.*` statistics) from a state dict, checking every field."""
    state_key = _quant_state_key(tensors, key)
    try:
        meta = json.loads(bytes(np.asarray(tensors[state_key], dtype=np.uint8)).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        shape, dtype = tuple(int(d) for d in meta["shape"]), jnp.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise BnbFormatError(f"{state_key}: not a valid bitsandbytes quant state ({type(e).__name__}: {e})") from e
    if state_key != f"{key}{_QUANT_STATE}{quant_type}":
        raise BnbFormatError(f"{state_key}: says quant_type {quant_type!r}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise BnbFormatError(f"{state_key}: unsupported blocksize {blocksize}")
    if dtype not in SUPPORTED_DTYPES:
        raise BnbFormatError(f"{state_key}: unsupported dtype {dtype.name}")
    size = math.prod(shape)
    num_blocks = -(-size // blocksize)
    packed = _packed_bytes(tensors, key, (size + 1) // 2)
    quant_map = _require(tensors, f"{key}.quant_map", np.float32, (16,))
    if not np.array_equal(quant_map, codebooks.code_table(quant_type)):
        raise BnbFormatError(
            f"{key}.quant_map: differs from bitsandbytes' {quant_type} table (custom maps are unsupported)"
        )
    nested = f"{key}.nested_absmax" in tensors
    if not nested:
        absmax = _finite(_require(tensors, f"{key}.absmax", np.float32, (num_blocks,)), f"{key}.absmax")
        return QuantizedTensor(packed, absmax, None, None, shape, dtype, quant_type, blocksize, None)
    try:
        dq_blocksize, offset = int(meta["nested_blocksize"]), np.float32(meta["nested_offset"])
        nested_dtype = meta["nested_dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise BnbFormatError(f"{state_key}: double-quantized but {e} is missing or malformed") from e
    if nested_dtype != "float32":
        raise BnbFormatError(f"{state_key}: unsupported nested_dtype {nested_dtype!r}")
    if dq_blocksize not in SUPPORTED_BLOCKSIZES:
        raise BnbFormatError(f"{state_key}: unsupported nested_blocksize {dq_blocksize}")
    absmax = _require(tensors, f"{key}.absmax", np.uint8, (num_blocks,))
    nested_absmax = _require(tensors, f"{key}.nested_absmax", np.float32, (-(-num_blocks // dq_blocksize),))
    _finite(nested_absmax, f"{key}.nested_absmax")
    if not np.isfinite(offset):
        raise BnbFormatError(f"{state_key}: nested_offset is {offset}")
    nested_map = _require(tensors, f"{key}.nested_quant_map", np.float32, (256,))
    if not np.array_equal(nested_map, codebooks.DYNAMIC_CODE):
        raise BnbFormatError(f"{key}.nested_quant_map: differs from bitsandbytes' dynamic map")
    return QuantizedTensor(packed, absmax, nested_absmax, offset, shape, dtype, quant_type, blocksize, dq_blocksize)


def quantized_weight_prefixes(keys: Iterable[str]) -> list[str]:
    """The weight names (e.g. `model.layers.0.mlp.up_proj.weight`) stored as bitsandbytes 4-bit tensors."""
    return sorted({k.split(_QUANT_STATE)[0] for k in keys if _QUANT_STATE in k})


def split_state_dict(tensors: Mapping[str, Any]) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Splits a state dict into its 4-bit weights (by weight name) and every other tensor."""
    quantized = {key: from_state_dict(tensors, key) for key in quantized_weight_prefixes(tensors)}
    owned = set()
    for key in quantized:
        owned.update(k for k in tensors if k == key or k.startswith(key + "."))
    rest = {k: v for k, v in tensors.items() if k not in owned}
    return quantized, rest


def merge_state_dict(quantized: Mapping[str, QuantizedTensor], rest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `split_state_dict`: one flat state dict, ready for `safetensors.numpy.save_file`."""
    out = {k: np.asarray(v) for k, v in rest.items()}
    for key, qt in quantized.items():
        for k, v in to_state_dict(qt, key).items():
            if k in out:
                raise ValueError(f"{k}: written twice (a 4-bit weight and a plain tensor share the name)")
            out[k] = v
    return out


# transformers' default skip list when llm_int8_skip_modules is null (`get_keys_to_not_convert`): the output
# embedding, which is the only linear it finds among the supported families (tied models have none).
DEFAULT_SKIP_MODULES = ("lm_head",)


def stored_quant_config(quantization_config: Mapping[str, Any], *, source: str = "config.json") -> QuantConfig:
    """The QuantConfig of a bitsandbytes 4-bit checkpoint from its config.json `quantization_config` alone (the
    blocksizes transformers always writes: 64 and 256; `qlora_jax.convert.hf` checks them against the tensors).
    Raises BnbFormatError for a quantization_config that is not bitsandbytes 4-bit, or fields of the wrong kind."""
    qc = quantization_config
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes" or not (
        qc.get("load_in_4bit") or qc.get("_load_in_4bit")
    ):
        raise BnbFormatError(f"{source}: only bitsandbytes 4-bit checkpoints are supported, got {dict(qc)}")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and (not isinstance(skip, list | tuple) or not all(isinstance(m, str) for m in skip)):
        raise BnbFormatError(
            f"{source}: quantization_config.llm_int8_skip_modules must list module names, got {skip!r}"
        )
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default
    if quant_type not in codebooks.BNB_QUANT_TYPES:
        raise BnbFormatError(f"{source}: quantization_config.bnb_4bit_quant_type {quant_type!r} is not nf4 or fp4")
    try:
        return QuantConfig(
            quant_type=quant_type,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            skip_modules=DEFAULT_SKIP_MODULES if skip is None else tuple(skip),
        )
    except ValueError as e:
        raise BnbFormatError(f"{source}: quantization_config.llm_int8_skip_modules: {e}") from e


def quantization_config(
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: list[str] | None = None,
) -> dict[str, Any]:
    """The `quantization_config` entry of config.json that makes transformers load a 4-bit checkpoint."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
    }
