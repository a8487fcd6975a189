"""A checkpoint's generation defaults: transformers' `generation_config.json` (its end-of-turn ids, padding and
sampling knobs, lengths), or the end ids llama.cpp keeps in a GGUF file's metadata.

transformers reads `generation_config.json` beside config.json into a `GenerationConfig` and `generate` uses it
for every field the caller does not pass: several end ids (`eos_token_id: [128001, 128008, 128009]` in Llama 3.1,
`<|im_end|>` beside `<|endoftext|>` in Qwen) end a sequence at any of them, `do_sample` / `temperature` / `top_k` /
`top_p` / `min_p` / `repetition_penalty` choose the next token, `max_new_tokens` / `max_length` bound the length.
A GGUF file keeps llama.cpp's `tokenizer.ggml.eos_token_id`, `eot_token_id` (end of turn) and `eom_token_id` (end
of message): the end ids read back here. `qlora_jax.generate` resolves these against the caller's
`SamplingConfig`; exports write them back (`merge_and_save`, `save_pretrained`: generation_config.json;
`save_gguf`: the eos / eot / eom keys).

A field that would change what transformers generates in a way `qlora_jax.generate` does not implement (beam
search, `no_repeat_ngram_size`, `stop_strings`, ...) is recorded, not refused on reading (training does not
generate): `GenerationDefaults.check_supported` refuses it before any generation starts, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import types
from collections.abc import Mapping
from typing import Any

from qlora_jax.models.config import ConfigError
from qlora_jax.models.config_files import GGUFError, is_gguf, open_gguf

__all__ = [
    "GENERATION_CONFIG",
    "GenerationDefaults",
    "UnsupportedGenerationError",
    "read_generation_config",
    "generation_config_from_dict",
    "GGUF_END_KEYS",
]

GENERATION_CONFIG = "generation_config.json"
# llama.cpp's end-of-generation ids in a GGUF file: end of sequence, end of turn, end of message (tool calls).
GGUF_END_KEYS = {
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}
_GGUF_BOS, _GGUF_PAD = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"

# transformers' GenerationConfig fields that change what `generate` returns and that qlora_jax.generate does not
# implement, with the values that leave them off (transformers' `_get_default_generation_params` and its
# processors' no-op values), and what they do.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "num_beams": ((None, 1), "beam search"),
    "num_beam_groups": ((None, 1), "group beam search"),
    "diversity_penalty": ((None, 0, 0.0), "group beam search"),
    "penalty_alpha": ((None, 0, 0.0), "contrastive search"),
    "dola_layers": ((None,), "DoLa decoding"),
    "num_return_sequences": ((None, 1), "several sequences per prompt"),
    "typical_p": ((None, 1, 1.0), "typical sampling"),
    "epsilon_cutoff": ((None, 0, 0.0), "epsilon sampling"),
    "eta_cutoff": ((None, 0, 0.0), "eta sampling"),
    "top_h": ((None,), "top-H sampling"),
    "no_repeat_ngram_size": ((None, 0), "n-gram blocking"),
    "encoder_no_repeat_ngram_size": ((None, 0), "n-gram blocking"),
    "encoder_repetition_penalty": ((None, 1, 1.0), "an encoder repetition penalty"),
    "bad_words_ids": ((None, []), "banned words"),
    "force_words_ids": ((None, []), "forced words"),
    "sequence_bias": ((None, {}, []), "sequence biases"),
    "suppress_tokens": ((None, []), "suppressed tokens"),
    "begin_suppress_tokens": ((None, []), "suppressed first tokens"),
    "forced_bos_token_id": ((None,), "a forced first token"),
    "forced_eos_token_id": ((None,), "a forced last token"),
    "min_length": ((None, 0), "a minimum length"),
    "min_new_tokens": ((None, 0), "a minimum length"),
    "exponential_decay_length_penalty": ((None,), "an end-of-sequence boost"),
    "guidance_scale": ((None, 1, 1.0), "classifier-free guidance"),
    "stop_strings": ((None, []), "stop strings"),
    "max_time": ((None,), "a time limit"),
    "watermarking_config": ((None,), "watermarking"),
}


class UnsupportedGenerationError(ConfigError):
    """A generation default (or argument) that qlora_jax.generate does not implement."""


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """What a checkpoint says generation should do when the caller does not say (None: it does not say).

    Attributes:
      eos_token_id: every id that ends a sequence (transformers stops at any of them); () when unsaid.
      bos_token_id, pad_token_id: as transformers' GenerationConfig holds them.
      do_sample: sample (True) or pick the most likely token (False, transformers' default).
      temperature, top_k, top_p, min_p, repetition_penalty: transformers' sampling knobs, same meanings.
      max_new_tokens, max_length: the length bound (max_length counts the prompt, as in transformers).
      unsupported: (field, value) of every field that changes what transformers generates and that
        `qlora_jax.generate` does not implement (see `check_supported`).
      source: the file the defaults come from (for messages).
      raw: the file's whole JSON object (generation_config.json), written back as it was by exports.
    """

    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    unsupported: tuple[tuple[str, Any], ...] = ()
    source: str = GENERATION_CONFIG
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def check_supported(self) -> None:
        """Raises UnsupportedGenerationError naming the first field that `qlora_jax.generate` cannot honour."""
        for name, value in self.unsupported:
            off, what = _UNSUPPORTED[name]
            raise UnsupportedGenerationError(
                f"{self.source}: {name}={value!r} ({what}) is not supported by qlora-jax generation (greedy or "
                f"sampling, with temperature, top_k, top_p, min_p and repetition_penalty); remove the field or set "
                f"it to {off[-1]!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of generation_config.json: the file read (unchanged), or one built from the fields."""
        if self.raw:
            return json.loads(json.dumps(_thawed(self.raw)))
        out: dict[str, Any] = {}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            out["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        for name in (
            "pad_token_id",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "max_new_tokens",
            "max_length",
        ):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _thawed(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def _token_id(value: Any, name: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: {name} must be a token id (an integer >= 0), got {value!r}")
    return value


def _number(
    raw: Mapping[str, Any],
    name: str,
    source: str,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> Any:
    value = raw.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value)
    if not bad:
        bad = (value <= low if low_open else value < low) or (high is not None and value > high)
    if bad:
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{source}: {name} must be {'an integer' if integer else 'a number'} {bounds}, got {value!r}")
    return value if integer else float(value)


def generation_config_from_dict(raw: Mapping[str, Any], *, source: str = GENERATION_CONFIG) -> GenerationDefaults:
    """The GenerationDefaults of a generation_config.json object; ConfigError naming the field for a malformed
    value (a token id that is no integer, a negative temperature, ...)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object")
    eos = raw.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list | tuple) else ([] if eos is None else [eos])
    eos_ids = tuple(_token_id(v, "eos_token_id", source) for v in eos_ids)
    do_sample = raw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ConfigError(f"{source}: do_sample must be true or false, got {do_sample!r}")
    unsupported = tuple(
        (name, raw[name]) for name, (off, _) in _UNSUPPORTED.items() if name in raw and raw[name] not in off
    )
    return GenerationDefaults(
        eos_token_id=tuple(dict.fromkeys(eos_ids)),
        bos_token_id=_token_id(raw.get("bos_token_id"), "bos_token_id", source),
        pad_token_id=_token_id(raw.get("pad_token_id"), "pad_token_id", source),
        do_sample=do_sample,
        temperature=_number(raw, "temperature", source, low=0.0, low_open=bool(do_sample)),
        top_k=_number(raw, "top_k", source, low=0, integer=True),
        top_p=_number(raw, "top_p", source, low=0.0, high=1.0, low_open=True),
        min_p=_number(raw, "min_p", source, low=0.0, high=1.0),
        repetition_penalty=_number(raw, "repetition_penalty", source, low=0.0, low_open=True),
        max_new_tokens=_number(raw, "max_new_tokens", source, low=1, integer=True),
        max_length=_number(raw, "max_length", source, low=1, integer=True),
        unsupported=unsupported,
        source=source,
        raw=_freeze(dict(raw)),
    )


def read_generation_config(path: str | os.PathLike) -> GenerationDefaults | None:
    """The generation defaults a checkpoint ships: `generation_config.json` in a model directory (or beside a
    config.json path), or the end ids of a GGUF file's metadata (eos, eot, eom: llama.cpp stops at each); None
    when it ships none. ConfigError / GGUFError name the file and the field that cannot be read."""
    path = pathlib.Path(path)
    if is_gguf(path):
        return _gguf_defaults(path)
    directory = path if path.is_dir() else path.parent
    file = directory / GENERATION_CONFIG
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{file}: cannot read a JSON object ({e})") from e
    return generation_config_from_dict(raw, source=str(file))


def _gguf_defaults(path: pathlib.Path) -> GenerationDefaults | None:
    fields = open_gguf(path).fields

    def token_id(key: str) -> int | None:
        field = fields.get(key)
        if field is None:
            return None
        try:
            value = field.contents()
        except (ValueError, IndexError) as e:
            raise GGUFError(f"{path}: metadata field {key!r} is corrupt: {e}") from e
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"{path}: metadata field {key!r} holds {value!r}, expected a token id")
        return value

    ends = tuple(dict.fromkeys(i for key in GGUF_END_KEYS.values() if (i := token_id(key)) is not None))
    bos, pad = token_id(_GGUF_BOS), token_id(_GGUF_PAD)
    if not ends and bos is None and pad is None:
        return None
    return GenerationDefaults(eos_token_id=ends, bos_token_id=bos, pad_token_id=pad, source=str(path))
