"""Trained embedding rows in PEFT's adapter files: `trainable_token_indices` and `modules_to_save`, both ways, and
the resized tables PEFT saves beside them.

What PEFT (0.21) writes beside the LoRA tensors (learned from `peft.utils.save_and_load` and the tuners' layers,
and checked against PEFT's own files in tests/test_tokens.py), for P = `model.embed_tokens` or `lm_head`:

- trainable tokens (`TrainableTokensLayer`): `base_model.model.P.token_adapter.trainable_tokens_delta` ([n, hidden],
  the rows' values, in the order of the config's ids). A tied head shares the embedding's.
- modules_to_save (`ModulesToSaveWrapper`): the trained copy under the module's own name, `base_model.model.P.weight`
  ([vocab, hidden]).
- the resized tables (`save_embedding_layers`, on by default when the vocabulary differs from the base model's
  config.json): the base table of each, `P.token_adapter.base_layer.weight` (a layer with trainable tokens),
  `P.original_module.weight` (with `P.modules_to_save.weight`, the copy again) or `P.weight` (neither). PEFT
  loads them into the resized model, replacing its freshly initialized rows: the adapter then computes the same
  logits whatever initialized them. A tied model's file repeats the embedding's under `lm_head.`.

`adapter_config.json` carries `trainable_token_indices` (a list, or {module name: ids}) and `modules_to_save` as
the LoraConfig has them. PEFT loads such an adapter onto a transformers model resized to the same vocabulary
(`model.resize_token_embeddings(n)` before `PeftModel.from_pretrained`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from qlora_jax.errors import InputError
from qlora_jax.lora import LoraConfig
from qlora_jax.models import DecoderLM, read_model_config
from qlora_jax.tokens import EMBED, LM_HEAD, TrainableTokens, check_trainable_rows, token_module, trainable_row_modules

__all__ = ["token_tensors", "token_targets_of", "read_token_tensors", "set_token_values", "resized_from"]

_PREFIX = "base_model.model."
_DELTA, _BASE_LAYER = "token_adapter.trainable_tokens_delta", "token_adapter.base_layer.weight"
_ORIGINAL, _COPY = "original_module.weight", "modules_to_save.weight"


def token_targets_of(model: DecoderLM) -> dict[str, tuple[int, ...] | None]:
    """{module path: trained row ids, None for a whole trained table} of the model's trainable rows."""
    return {
        path: rows.token_indices if isinstance(rows, TrainableTokens) else None
        for path, rows in trainable_row_modules(model).items()
    }


def _tables(model: DecoderLM) -> list[str]:
    """The 16-bit tables: the embedding, and an untied head stored dense."""
    head = model.lm_head
    return [EMBED] + ([LM_HEAD] if head is not None and not head.is_quantized else [])


def resized_from(model: DecoderLM, base_model_name_or_path: str | None) -> bool:
    """PEFT's `save_embedding_layers="auto"`: whether the base model's config (a local directory or GGUF file)
    has another vocabulary size than `model` (Hub ids are not looked up: False)."""
    if not base_model_name_or_path or not os.path.exists(base_model_name_or_path):
        return False
    try:
        return read_model_config(base_model_name_or_path).vocab_size != model.config.vocab_size
    except (InputError, OSError):
        return False


def token_tensors(model: DecoderLM, *, save_embedding_layers: bool = False) -> dict[str, np.ndarray]:
    """The PEFT tensors (float32) of the model's trained rows, and with `save_embedding_layers` its base tables
    (the resized embedding and untied head), under PEFT's keys (see the module docstring)."""
    out = {}
    for path in _tables(model):
        module = token_module(model, path)
        rows = module.trainable_rows
        if isinstance(rows, TrainableTokens):
            out[f"{_PREFIX}{path}.{_DELTA}"] = np.ascontiguousarray(rows.trainable_tokens_delta[...], np.float32)
        elif rows is not None:
            out[f"{_PREFIX}{path}.weight"] = np.ascontiguousarray(rows.weight[...], np.float32)
        if save_embedding_layers:
            base = _BASE_LAYER if isinstance(rows, TrainableTokens) else _ORIGINAL if rows is not None else "weight"
            out[f"{_PREFIX}{path}.{base}"] = np.ascontiguousarray(module.weight[...], np.float32)
            if rows is not None and not isinstance(rows, TrainableTokens):  # PEFT writes the copy twice then
                out[f"{_PREFIX}{path}.{_COPY}"] = out[f"{_PREFIX}{path}.weight"]
    if save_embedding_layers and model.lm_head is None:  # tied: PEFT repeats the embedding's under lm_head
        embed = f"{_PREFIX}{EMBED}."
        out.update({f"{_PREFIX}{LM_HEAD}.{k[len(embed) :]}": v for k, v in list(out.items()) if k.startswith(embed)})
    return out


def read_token_tensors(
    model: DecoderLM,
    config: LoraConfig,
    tensors: dict[str, np.ndarray],
    *,
    lora_targets: Any,
    weights_path: str | os.PathLike,
    config_path: str | os.PathLike,
    error: type[InputError],
) -> dict[str, dict[str, np.ndarray]]:
    """{module path: {"trainable_tokens_delta" or "weight": the trained values, "base": the base table}} of the
    trained rows `config` names and of the resized tables the file carries, taken out of `tensors` (the adapter
    file's, by key) and checked against `model`: the rows exist (else: resize it to the tokenizer's size first),
    each tensor is there with its shape. Raises `error` naming the file and the tensor."""
    try:
        targets = check_trainable_rows(
            model, config.trainable_token_indices, config.modules_to_save, lora_targets=lora_targets
        )
    except ValueError as e:
        raise error(f"{config_path}: {e}") from e

    def take(key: str, shape: tuple[int, int], what: str) -> np.ndarray:
        value = tensors.pop(f"{_PREFIX}{key}")
        if value.shape != shape:
            hint = ""
            if value.ndim == 2 and value.shape[1] == shape[1] and shape[0] == model.config.vocab_size:
                hint = f": resize the model's embedding to {value.shape[0]} rows first (resize_token_embeddings)"
            raise error(
                f"{weights_path}: {_PREFIX}{key} ({what}) has shape {value.shape}, the model needs {shape}{hint}"
            )
        return value

    values: dict[str, dict[str, np.ndarray]] = {}
    for path in _tables(model):
        # (shapes only: the model may be abstract, its arrays ShapeDtypeStructs)
        shape = (model.config.vocab_size, token_module(model, path).weight.get_value().shape[-1])
        ids = targets.get(path, ())
        fields: dict[str, np.ndarray] = {}
        if ids is None:  # modules_to_save: the trained copy under the module's name
            if f"{_PREFIX}{path}.weight" not in tensors:
                raise error(f"{weights_path}: {_PREFIX}{path}.weight is missing (modules_to_save names {path})")
            fields["weight"] = take(f"{path}.weight", shape, "modules_to_save")
            if f"{_PREFIX}{path}.{_COPY}" in tensors:
                take(f"{path}.{_COPY}", shape, "modules_to_save")  # the same copy again
            base_keys = [_ORIGINAL]
        elif ids:
            if f"{_PREFIX}{path}.{_DELTA}" not in tensors:
                raise error(
                    f"{weights_path}: {_PREFIX}{path}.{_DELTA} is missing (trainable_token_indices names {path})"
                )
            fields["trainable_tokens_delta"] = take(f"{path}.{_DELTA}", (len(ids), shape[1]), "trainable tokens")
            base_keys = [_BASE_LAYER]
        else:
            base_keys = ["weight"]
        for key in base_keys:
            if f"{_PREFIX}{path}.{key}" in tensors:
                fields["base"] = take(f"{path}.{key}", shape, "the resized table")
        if fields:
            values[path] = fields
    if model.lm_head is None:  # a tied model: PEFT's file repeats the embedding's tensors under lm_head
        embed = values.get(EMBED, {})
        for key, field in ((_DELTA, "trainable_tokens_delta"), (_BASE_LAYER, "base"), ("weight", "base")):
            value = tensors.pop(f"{_PREFIX}{LM_HEAD}.{key}", None)
            if value is not None and (field not in embed or not np.array_equal(value, embed[field])):
                raise error(
                    f"{weights_path}: {_PREFIX}{LM_HEAD}.{key} is not the embedding's, but this model ties "
                    "its output head to the embedding"
                )
    elif LM_HEAD not in _tables(model) and any(
        k.startswith(f"{_PREFIX}{LM_HEAD}.") and "lora_" not in k for k in tensors
    ):
        raise error(
            f"{weights_path}: holds lm_head's table, but this model's lm_head is stored in 4 bits; load it "
            "in 16 bits (quant skip_modules lm_head, the default)"
        )
    return values


def set_token_values(model: DecoderLM, values: dict[str, dict[str, np.ndarray]]) -> None:
    """Writes read values (`read_token_tensors`) into the model: base tables into the (frozen) embedding / head,
    trained values into their trainable rows (added by `apply_lora`)."""
    import jax.numpy as jnp

    for path, fields in values.items():
        module = token_module(model, path)
        for field, value in fields.items():
            if field == "base":
                module.weight.set_value(jnp.asarray(value).astype(module.weight[...].dtype))
            else:
                getattr(module.trainable_rows, field).set_value(jnp.asarray(value, jnp.float32))
