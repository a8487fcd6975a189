"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, seeded; prompts left-padded.

Two compiled programs do the work: `prefill` over the padded prompts (it builds the KV cache), and `decode`, the
whole generation loop in one program: a `lax.while_loop` that samples on the device and decodes one token a step
for the whole batch, writing the donated KV cache in place, until every sequence has stopped or reached
max_new_tokens. Decoding reads the stacked 4-bit weights where they lie (`models.decoder`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.models import ComputeOptions, DecoderLM, KVCache

__all__ = ["SamplingConfig", "generate", "generate_text", "sample_logits", "chat_token_ids", "prefill", "decode"]


def chat_token_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """The chat template applied and tokenized (transformers 4 returns a list, 5 a BatchEncoding)."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """max_new_tokens: tokens to add at most; temperature 0 is greedy; top_k / top_p filter before sampling;
    stop_token_ids end a sequence (default: the model's eos tokens); seed makes sampling reproducible."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V]."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_k is not None:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose probability reaches top_p (at least one token)
        cutoff_index = jnp.sum(cumulative < config.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "options"))
def prefill(graphdef, state, tokens, valid, *, cache_length: int, options: ComputeOptions):
    """The prompts' pass: (float32 logits [B, V] of each prompt's last token, the KV cache holding the prompts
    (cache_length slots), each sequence's next position [B]). tokens, valid: [B, T], left-padded."""
    model: DecoderLM = nnx.merge(graphdef, state)
    batch, _ = tokens.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.empty(model.config, batch, cache_length, model.dtype)
    h, cache = model.hidden_states(tokens, positions=positions, cache=cache, valid=valid, options=options)
    return model.logits(h[:, -1], options=options), cache, positions[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "options"), donate_argnames=("cache",))
def decode(
    graphdef, state, logits, cache: KVCache, next_position, stop_ids, *, config: SamplingConfig, options: ComputeOptions
):
    """The generation loop, one compiled program: a `lax.while_loop` that samples a token (on the device) from
    the last logits, runs it through the model writing the donated KV cache in place, until every sequence has
    stopped or config.max_new_tokens are out. Returns (tokens [B, max_new_tokens] (0 after a stop), lengths [B],
    the final cache)."""
    model: DecoderLM = nnx.merge(graphdef, state)
    batch = logits.shape[0]
    key = jax.random.key(config.seed)
    out = jnp.zeros((batch, config.max_new_tokens), jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < config.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, out, done, lengths, position = carry
        token = sample_logits(logits, jax.random.fold_in(key, step), config)
        stopped = jnp.isin(token, stop_ids)
        out = out.at[:, step].set(jnp.where(done | stopped, 0, token))
        lengths = lengths + (~done & ~stopped)
        done = done | stopped
        h, cache = model.hidden_states(token[:, None], positions=position[:, None], cache=cache, options=options)
        return step + 1, model.logits(h[:, -1], options=options), cache, out, done, lengths, position + 1

    carry = (jnp.int32(0), logits, cache, out, done, lengths, next_position)
    _, _, cache, out, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, cache


def generate(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig = SamplingConfig(),
    *,
    pad_token_id: int = 0,
    options: ComputeOptions = ComputeOptions(),
) -> list[list[int]]:
    """Token ids generated after each prompt (the stop token excluded), for a batch of prompts of any lengths;
    `options` chooses the kernels and attention (compiled in: another value compiles again). Decoding reads a
    KV cache through a key-validity mask, which cuDNN's attention lacks: attention="cudnn" generates with "auto"."""
    if options.attention == "cudnn":
        options = dataclasses.replace(options, attention="auto")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), longest), pad_token_id, np.int32)
    valid = np.zeros((len(prompts), longest), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = prompt  # left padding: every sequence ends at the same slot
        valid[row, longest - len(prompt) :] = True
    stop = config.stop_token_ids if config.stop_token_ids is not None else model.config.eos_token_ids
    graphdef, state = nnx.split(model)
    cache_length = longest + config.max_new_tokens
    logits, cache, position = prefill(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), cache_length=cache_length, options=options
    )
    stop_ids = jnp.asarray(list(stop) or [-1], jnp.int32)
    out, lengths, _ = decode(graphdef, state, logits, cache, position, stop_ids, config=config, options=options)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[row, : lengths[row]].tolist() for row in range(len(prompts))]


def generate_text(
    model: DecoderLM,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    config: SamplingConfig = SamplingConfig(),
    *,
    chat: bool = True,
    options: ComputeOptions = ComputeOptions(),
) -> list[str]:
    """Completions for text prompts; with `chat`, each prompt is a user message (or a list of messages) rendered
    with the tokenizer's chat template. `options` as for `generate`."""
    ids = []
    for prompt in prompts:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids.append(chat_token_ids(tokenizer, messages))
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    if config.stop_token_ids is None and tokenizer.eos_token_id is not None:
        stop = set(model.config.eos_token_ids) | {tokenizer.eos_token_id}
        config = dataclasses.replace(config, stop_token_ids=tuple(sorted(stop)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [
        tokenizer.decode(out, skip_special_tokens=True)
        for out in generate(model, ids, config, pad_token_id=pad, options=options)
    ]
