"""Added tokens: resizing the embedding (and an untied output head), and training rows of them as PEFT does.

A tokenizer with added tokens (chat markers, tool-call tags) has ids past the rows of a model not yet resized.
`resize_token_embeddings` grows (or cuts) `model.embed_tokens` and an untied `lm_head` as transformers'
`resize_token_embeddings` does with its default `mean_resizing=True`: each new row is the mean of the old rows, in
float32, then cast (transformers samples it from a normal of that mean and 1e-9 times the rows' covariance: the
same rows up to that noise).

The new rows then train as PEFT trains them, with PEFT's names (`LoraConfig.trainable_token_indices`,
`LoraConfig.modules_to_save`):

- `TrainableTokens` (PEFT's `TrainableTokensLayer`, `trainable_token_indices`): a float32 `nnx.LoRAParam`
  `trainable_tokens_delta` [n, D] holds the *values* (not differences) of rows `token_indices` of the table; they
  replace those rows wherever the table is read: the embedding lookup, the tied output projection (PEFT's tied
  adapter follows the embedding's), or an untied lm_head's logits of those tokens. They start as copies of the
  rows (PEFT's `init_weights=True`).
- `TrainedCopy` (PEFT's `ModulesToSaveWrapper`, `modules_to_save`): a float32 copy of the whole table, trained in
  its place.

Both attach to `Embed` / `QLinear` as their `trainable_rows`, which the layers call (`embed`, `project`); each is
computed in the table's dtype, as PEFT computes with rows cast to the weight's dtype. `merged(table)` is the
table with the trained rows in, for merged exports. PEFT's files for both: `qlora_jax.convert.peft_tokens`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.models import DecoderLM
from qlora_jax.nn import Embed, QLinear
from qlora_jax.parallel.mesh import gathered

__all__ = [
    "EMBED",
    "LM_HEAD",
    "TOKEN_MODULES",
    "TrainableTokens",
    "TrainedCopy",
    "resize_token_embeddings",
    "token_module",
    "normalize_trainable_token_indices",
    "normalize_modules_to_save",
    "token_targets",
    "check_trainable_rows",
    "apply_trainable_rows",
    "trainable_row_modules",
]

EMBED, LM_HEAD = "model.embed_tokens", "lm_head"
# The names PEFT matches (as a module name or its suffix) for the embedding and the output head.
TOKEN_MODULES = {"embed_tokens": EMBED, "model.embed_tokens": EMBED, "lm_head": LM_HEAD}


class TrainableTokens(nnx.Module):
    """Trained values of rows `token_indices` of an embedding (or output head) table [V, D]: PEFT's
    TrainableTokensLayer. `trainable_tokens_delta` [n, D] float32 starts as the rows' values."""

    def __init__(self, table: jax.Array, token_indices: Sequence[int]):
        self.token_indices = tuple(int(i) for i in token_indices)
        rows = jnp.asarray(table)[jnp.asarray(self.token_indices)]
        self.trainable_tokens_delta = nnx.LoRAParam(rows.astype(jnp.float32))

    def _values(self, dtype: Any) -> jax.Array:
        return gathered(self.trainable_tokens_delta[...]).astype(dtype)

    def embed(self, tokens: jax.Array, rows: jax.Array) -> jax.Array:
        """The looked-up rows [..., D] (in the table's dtype) of `tokens`, the trained ones replaced."""
        match = tokens[..., None] == jnp.asarray(self.token_indices, tokens.dtype)  # [..., n]
        trained = jnp.take(self._values(rows.dtype), jnp.argmax(match, axis=-1), axis=0)  # [..., D]
        return jnp.where(match.any(axis=-1, keepdims=True), trained, rows)

    def project(self, x: jax.Array, out: jax.Array, table_dtype: Any) -> jax.Array:
        """Logits `out` [..., V] of the projection x @ table.T with the trained rows' logits replaced."""
        values = self._values(table_dtype).astype(x.dtype)
        logits = jnp.dot(x, values.T, preferred_element_type=jnp.float32).astype(out.dtype)  # [..., n]
        return out.at[..., jnp.asarray(self.token_indices)].set(logits)

    def merged(self, table: jax.Array) -> jax.Array:
        """The table with the trained rows written in (PEFT's merge: index_copy)."""
        return jnp.asarray(table).at[jnp.asarray(self.token_indices)].set(self._values(table.dtype))


class TrainedCopy(nnx.Module):
    """A trained float32 copy `weight` [V, D] of a whole table: PEFT's ModulesToSaveWrapper."""

    def __init__(self, table: jax.Array):
        self.weight = nnx.LoRAParam(jnp.asarray(table).astype(jnp.float32))

    def embed(self, tokens: jax.Array, rows: jax.Array) -> jax.Array:
        return jnp.take(gathered(self.weight[...]).astype(rows.dtype), tokens, axis=0)

    def project(self, x: jax.Array, out: jax.Array, table_dtype: Any) -> jax.Array:
        w = gathered(self.weight[...]).astype(table_dtype).astype(x.dtype)
        return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(out.dtype)

    def merged(self, table: jax.Array) -> jax.Array:
        return gathered(self.weight[...]).astype(table.dtype)


def token_module(model: DecoderLM, name: str) -> Embed | QLinear:
    """The module `model.embed_tokens` or `lm_head` (ValueError for a tied model's lm_head, which has none)."""
    if name == EMBED:
        return model.model.embed_tokens
    if model.lm_head is None:
        raise ValueError(
            "lm_head: this model ties its output head to the embedding (tie_word_embeddings), so "
            "it has no lm_head of its own; train the rows under embed_tokens: the tied head follows"
        )
    return model.lm_head


def _table(module: Embed | QLinear) -> jax.Array:
    return module.weight[...]


def _indices(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{where} must be a non-empty list of token ids, got {value!r}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{where} must hold token ids (integers >= 0), got {i!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where} lists a token id more than once")
    return tuple(value)


def normalize_trainable_token_indices(value: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """PEFT's `trainable_token_indices`: a list of ids (for the input embedding) or {module name: ids} with the
    names PEFT matches (`embed_tokens`, `lm_head`); ValueError naming what is wrong."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("trainable_token_indices must name at least one module")
        out = {}
        for name, ids in value.items():
            if name not in TOKEN_MODULES:
                raise ValueError(
                    f"trainable_token_indices: module {name!r} is not supported (embed_tokens or "
                    "lm_head: the embedding and the output head)"
                )
            out[name] = _indices(ids, f"trainable_token_indices[{name!r}]")
        if len({TOKEN_MODULES[name] for name in out}) != len(out):
            raise ValueError("trainable_token_indices names the embedding twice (embed_tokens, model.embed_tokens)")
        return out
    return _indices(value, "trainable_token_indices")


def normalize_modules_to_save(value: Any) -> tuple[str, ...] | None:
    """PEFT's `modules_to_save`, of which the embedding and the output head are supported (whole tables trained);
    ValueError naming any other module."""
    if value is None or (isinstance(value, list | tuple) and not value):
        return None
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"modules_to_save must be a list of module names, got {value!r}")
    for name in names:
        if name not in TOKEN_MODULES:
            raise ValueError(
                f"modules_to_save: {name!r} is not supported: only embed_tokens and lm_head (the "
                "embedding and the output head) are trained whole here"
            )
    return tuple(names)


def token_targets(trainable_token_indices: Any, modules_to_save: Any) -> dict[str, tuple[int, ...] | None]:
    """{module path (`model.embed_tokens`, `lm_head`): the trained row ids, or None for the whole table}: PEFT's
    reading of the two fields (a list of ids is the input embedding's). ValueError for a module in both."""
    targets: dict[str, tuple[int, ...] | None] = {}
    indices = normalize_trainable_token_indices(trainable_token_indices)
    if isinstance(indices, tuple):
        indices = {"embed_tokens": indices}
    for name, ids in (indices or {}).items():
        targets[TOKEN_MODULES[name]] = ids
    for name in normalize_modules_to_save(modules_to_save) or ():
        path = TOKEN_MODULES[name]
        if targets.get(path, None) is not None:
            raise ValueError(f"{name} is in both modules_to_save and trainable_token_indices: pick one")
        targets[path] = None
    return targets


def trainable_row_modules(model: DecoderLM) -> dict[str, TrainableTokens | TrainedCopy]:
    """{module path: its trainable rows} of the embedding and an untied head that have some."""
    out = {}
    for path in (EMBED, LM_HEAD):
        module = model.model.embed_tokens if path == EMBED else model.lm_head
        if module is not None and module.trainable_rows is not None:
            out[path] = module.trainable_rows
    return out


def check_trainable_rows(
    model: DecoderLM, trainable_token_indices: Any, modules_to_save: Any, *, lora_targets: Sequence[str] = ()
) -> dict[str, tuple[int, ...] | None]:
    """`token_targets`, after checking them against `model` (and the LoRA adapters about to be added,
    `lora_targets`: module paths). ValueError: an id past the table's rows (resize first), lm_head on a tied model,
    a whole-table copy on a tied model (PEFT would untie it), a 4-bit lm_head, an lm_head that also gets a LoRA
    adapter, or rows already added."""
    targets = token_targets(trainable_token_indices, modules_to_save)
    vocab = model.config.vocab_size
    for path, ids in targets.items():
        module = token_module(model, path)
        name = "modules_to_save" if ids is None else "trainable_token_indices"
        if module.trainable_rows is not None:
            raise ValueError(f"{path} already has trainable rows")
        if ids is None and model.config.tie_word_embeddings:
            raise ValueError(
                "modules_to_save: this model ties its output head to embed_tokens; PEFT would train "
                "a copy of the embedding and leave the head on the old one (untying them): train the "
                "rows with trainable_token_indices, which the tied head follows"
            )
        if isinstance(module, QLinear):
            if module.is_quantized:
                raise ValueError(
                    f"{name}: lm_head is stored in 4 bits; keep it in 16 bits (quant skip_modules "
                    "lm_head, the default) to train its rows"
                )
            if module.lora is not None or path in lora_targets:
                raise ValueError(f"{name}: lm_head also gets a LoRA adapter (target_modules); train it one way")
        if ids is not None and max(ids) >= vocab:
            raise ValueError(
                f"trainable_token_indices: token ids up to {max(ids)} but the embedding has {vocab} rows: resize "
                f"it first (resize_token_embeddings to the tokenizer's size; docs/lora.md#added-tokens)"
            )
    return targets


def apply_trainable_rows(model: DecoderLM, trainable_token_indices: Any, modules_to_save: Any) -> list[str]:
    """Adds PEFT's trainable token rows (`TrainableTokens`) and whole trained tables (`TrainedCopy`) to the
    embedding and the untied output head, as `trainable_token_indices` / `modules_to_save` say, after
    `check_trainable_rows` (ValueError, the model unchanged); returns the module paths."""
    targets = check_trainable_rows(model, trainable_token_indices, modules_to_save)
    for path, ids in targets.items():
        module = token_module(model, path)
        table = _table(module)
        module.trainable_rows = TrainedCopy(table) if ids is None else TrainableTokens(table, ids)
    return list(targets)


def _mean_resized(table: jax.Array, rows: int) -> jax.Array:
    """The table cut or grown to `rows`, new rows the mean of the old ones (float32, then cast)."""
    table = jnp.asarray(table)
    if rows <= table.shape[0]:
        return table[:rows]
    mean = jnp.mean(table.astype(jnp.float32), axis=0).astype(table.dtype)
    return jnp.concatenate([table, jnp.broadcast_to(mean, (rows - table.shape[0], table.shape[1]))])


def resize_token_embeddings(model: DecoderLM, new_num_tokens: int) -> DecoderLM:
    """Resizes the embedding (and an untied lm_head) to `new_num_tokens` rows, in place, as transformers'
    `resize_token_embeddings(new_num_tokens)` with `mean_resizing=True` does (new rows: the mean of the old rows;
    see the module docstring); the config's vocab_size follows (config.json of exports). Returns the model.

    ValueError for a model with adapters on the tables (resize before `apply_lora`), or a 4-bit lm_head.
    """
    if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
        raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
    config = model.config
    if new_num_tokens == config.vocab_size:
        return model
    head = model.lm_head
    if trainable_row_modules(model) or (head is not None and head.lora is not None):
        raise ValueError("resize_token_embeddings: the embedding or lm_head already has adapters; resize first")
    if head is not None and head.is_quantized:
        raise ValueError(
            "resize_token_embeddings: lm_head is stored in 4 bits; load it in 16 bits (quant "
            "skip_modules lm_head, the default) to resize it"
        )
    embed = model.model.embed_tokens
    embed.weight.set_value(_mean_resized(embed.weight[...], new_num_tokens))
    if head is not None:
        head.weight.set_value(_mean_resized(head.weight[...], new_num_tokens))
        head.out_features = new_num_tokens
    hf = dict(config.hf_config)
    if hf:
        hf["vocab_size"] = new_num_tokens
        if isinstance(hf.get("text_config"), Mapping):
            hf["text_config"] = {**hf["text_config"], "vocab_size": new_num_tokens}
    model.config = dataclasses.replace(config, vocab_size=new_num_tokens, hf_config=types.MappingProxyType(hf))
    return model
