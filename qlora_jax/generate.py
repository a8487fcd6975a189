"""Batched generation with a KV cache: greedy or sampled (temperature, top-k, top-p, min-p), a repetition penalty,
stop tokens, seeded; prompts left-padded.

Two compiled programs do the work: `prefill` over the padded prompts (it builds the KV cache), and `decode`, the
whole generation loop in one program: a `lax.while_loop` that samples on the device and decodes one token a step
for the whole batch, writing the donated KV cache in place, until every sequence has stopped or reached
max_new_tokens. Decoding reads the stacked 4-bit weights where they lie (`models.decoder`).

What the caller leaves unset in `SamplingConfig` comes from the checkpoint's generation defaults
(`model.config.generation`: its generation_config.json, or a GGUF's end ids), then from transformers'
`GenerationConfig` defaults, exactly as transformers' `generate` resolves them (`SamplingConfig.resolved`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.errors import InputError
from qlora_jax.models import ComputeOptions, DecoderLM, KVCache
from qlora_jax.models.generation_config import GenerationDefaults, UnsupportedGenerationError
from qlora_jax.tokenizer import ChatTemplateTimeout, apply_chat_template, check_token_ids

__all__ = [
    "SamplingConfig",
    "generate",
    "generate_text",
    "sample_logits",
    "apply_repetition_penalty",
    "min_p_filter",
    "chat_token_ids",
    "prefill",
    "decode",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TOP_K",
    "UnsupportedGenerationError",
]

DEFAULT_MAX_NEW_TOKENS = 64  # when neither the caller nor the checkpoint bounds the length
DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, applied when sampling with top_k unset everywhere


def chat_token_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """The chat template applied (with `tools`, JSON schemas the template shows the model) and tokenized
    (transformers 4 returns a list, 5 a BatchEncoding). A template that fails (its own error, the sandbox's
    SecurityError, MemoryError) or runs past its time is an InputError."""
    try:
        encoded = apply_chat_template(
            tokenizer,
            messages,
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
        )
    except (Exception, ChatTemplateTimeout) as e:
        raise InputError(f"the chat template fails on this prompt ({type(e).__name__}: {e})") from e
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _number(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick the next tokens, with transformers' meanings; None: the checkpoint's generation default
    (`model.config.generation`, from generation_config.json), else transformers' default (`resolved`).

    Attributes:
      max_new_tokens: tokens to add at most (default: the checkpoint's max_new_tokens, or its max_length minus the
        prompt, else 64).
      temperature: 0 is greedy, > 0 samples at that temperature (default: the checkpoint's do_sample and
        temperature; greedy if it says nothing, as transformers).
      top_k: keep the k most likely tokens when sampling; 0 turns it off (default: the checkpoint's, else 50, as
        transformers). top_p: keep the smallest set whose probability reaches top_p (1.0: off).
      min_p: keep the tokens whose probability is at least min_p times the most likely one's (transformers'
        MinPLogitsWarper, after temperature, top-k and top-p).
      repetition_penalty: every token already in the prompt (its padding excluded) or generated has its logit
        divided by the penalty if positive, multiplied if negative, greedy or sampled (transformers'
        RepetitionPenaltyLogitsProcessor); 1.0: off.
      stop_token_ids: a sequence ends at the first of these (excluded from the output); default: every end id of
        the checkpoint's generation_config.json, else config.json's eos_token_id; () never stops early.
      seed: makes sampling reproducible.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            _number(getattr(self, name), name)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {self.repetition_penalty}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def resolved(
        self, defaults: GenerationDefaults | None, *, eos_token_ids: Sequence[int] = (), prompt_length: int = 0
    ) -> SamplingConfig:
        """Every field decided, as transformers' `generate` decides it: this config's value, else the checkpoint's
        (`defaults`), else transformers' default; `eos_token_ids` (config.json's) stop when neither names any.
        Off values become None (top_k 0, top_p 1, repetition_penalty 1); greedy drops the sampling filters.

        Raises UnsupportedGenerationError for a checkpoint default qlora-jax does not implement (beam search, ...)
        and ValueError when the checkpoint's max_length leaves no room after a prompt of `prompt_length` tokens."""
        g = defaults or GenerationDefaults()
        g.check_supported()

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return getattr(g, name) if value is None else value

        temperature = self.temperature
        if temperature is None:
            temperature = (1.0 if g.temperature is None else g.temperature) if g.do_sample else 0.0
        stop = self.stop_token_ids
        if stop is None:
            stop = g.eos_token_id or tuple(eos_token_ids)
        max_new = self.max_new_tokens or g.max_new_tokens
        if max_new is None and g.max_length is not None:
            max_new = g.max_length - prompt_length
            if max_new < 1:
                raise ValueError(
                    f"{g.source}: max_length={g.max_length} leaves no room after a prompt of "
                    f"{prompt_length} tokens; pass max_new_tokens"
                )
        penalty = pick("repetition_penalty")
        out = dict(
            max_new_tokens=max_new or DEFAULT_MAX_NEW_TOKENS,
            temperature=float(temperature),
            repetition_penalty=None if penalty in (None, 1.0) else float(penalty),
            stop_token_ids=stop,
            seed=self.seed,
        )
        if temperature:  # sampling: the filters, with transformers' top_k default
            top_k, top_p = pick("top_k"), pick("top_p")
            top_k = DEFAULT_TOP_K if top_k is None else top_k
            out.update(top_k=top_k or None, top_p=None if top_p in (None, 1.0) else top_p, min_p=pick("min_p"))
        return SamplingConfig(**out)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor: float32 logits [B, V] of the tokens `seen` (bool [B, V])
    divided by `penalty` where positive, multiplied where negative."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """transformers' MinPLogitsWarper: logits [B, V] of tokens less probable than min_p times the most probable one
    set to -inf (the most probable is always kept, min_p <= 1)."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, -jnp.inf, logits)


def sample_logits(
    logits: jax.Array, key: jax.Array, config: SamplingConfig, seen: jax.Array | None = None
) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V], in transformers' order: repetition penalty (on the tokens
    `seen`, bool [B, V]), then greedy argmax, or temperature, top-k, top-p, min-p and a draw. None fields are off
    (pass a `resolved` config for the checkpoint's defaults)."""
    if config.repetition_penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_k:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose probability reaches top_p (at least one token)
        cutoff_index = jnp.sum(cumulative < config.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if config.min_p is not None:
        logits = min_p_filter(logits, config.min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _seen_tokens(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B, V]: the vocabulary entries among each row's valid tokens."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    counts = jnp.zeros((tokens.shape[0], vocab_size), jnp.int32).at[rows, tokens].add(valid.astype(jnp.int32))
    return counts > 0


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
    graphdef,
    state,
    logits,
    cache: KVCache,
    next_position,
    stop_ids,
    seen,
    *,
    config: SamplingConfig,
    options: ComputeOptions,
):
    """The generation loop, one compiled program: a `lax.while_loop` that samples a token (on the device) from
    the last logits, runs it through the model writing the donated KV cache in place, until every sequence has
    stopped or config.max_new_tokens are out. `seen` (bool [B, V]; [B, 0] without a repetition penalty): the tokens
    the penalty applies to, the prompts' (`_seen_tokens`), then each generated one. Returns (tokens [B,
    max_new_tokens] (0 after a stop), lengths [B], the final cache)."""
    model: DecoderLM = nnx.merge(graphdef, state)
    batch = logits.shape[0]
    key = jax.random.key(config.seed)
    out = jnp.zeros((batch, config.max_new_tokens), jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)
    done = jnp.zeros((batch,), bool)
    penalty = config.repetition_penalty is not None

    def cond(carry):
        step, _, _, _, done, _, _, _ = carry
        return (step < config.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, out, done, lengths, position, seen = carry
        token = sample_logits(logits, jax.random.fold_in(key, step), config, seen if penalty else None)
        stopped = jnp.isin(token, stop_ids)
        out = out.at[:, step].set(jnp.where(done | stopped, 0, token))
        lengths = lengths + (~done & ~stopped)
        done = done | stopped
        if penalty:
            seen = seen.at[jnp.arange(batch), token].set(True)
        h, cache = model.hidden_states(token[:, None], positions=position[:, None], cache=cache, options=options)
        return step + 1, model.logits(h[:, -1], options=options), cache, out, done, lengths, position + 1, seen

    carry = (jnp.int32(0), logits, cache, out, done, lengths, next_position, seen)
    _, _, cache, out, _, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, cache


def generate(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig = SamplingConfig(),
    *,
    pad_token_id: int | None = None,
    options: ComputeOptions = ComputeOptions(),
) -> list[list[int]]:
    """Token ids generated after each prompt (the stop token excluded), for a batch of prompts of any lengths.

    `config`'s unset fields come from the checkpoint (`model.config.generation`), then transformers' defaults
    (`SamplingConfig.resolved`): a Llama 3.1 checkpoint stops at any of its end ids, a Qwen one samples as its
    generation_config.json says. `pad_token_id` (default: the checkpoint's, else 0) fills the left padding, which
    is never attended to. `options` chooses the kernels and attention (compiled in: another value compiles again).
    Decoding reads a KV cache through a key-validity mask, which cuDNN's attention lacks: attention="cudnn"
    generates with "auto".

    Raises TokenIdError (before compiling) for prompt ids the embedding has no row for, UnsupportedGenerationError
    for a checkpoint default that qlora-jax does not implement, ValueError for an empty prompt.
    """
    if options.attention == "cudnn":
        options = dataclasses.replace(options, attention="auto")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_token_ids(prompts, model.config.vocab_size, "generate: the prompts")
    longest = max(len(p) for p in prompts)
    defaults = model.config.generation
    config = config.resolved(defaults, eos_token_ids=model.config.eos_token_ids, prompt_length=longest)
    if pad_token_id is None:
        pad_token_id = defaults.pad_token_id if defaults is not None and defaults.pad_token_id is not None else 0
    pad_token_id = pad_token_id if 0 <= pad_token_id < model.config.vocab_size else 0
    # dynamic NTK scaling is made to run past max_position_embeddings (its frequencies rescale with the length)
    past = longest + config.max_new_tokens > model.config.max_position_embeddings
    if past and model.config.rope.rope_type != "dynamic":
        raise InputError(
            f"max_new_tokens: a prompt of {longest} tokens and {config.max_new_tokens} new tokens go past "
            f"the model's {model.config.max_position_embeddings} positions (max_position_embeddings); "
            "give fewer new tokens or a shorter prompt"
        )
    tokens = np.full((len(prompts), longest), pad_token_id, np.int32)
    valid = np.zeros((len(prompts), longest), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = prompt  # left padding: every sequence ends at the same slot
        valid[row, longest - len(prompt) :] = True
    graphdef, state = nnx.split(model)
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
    logits, cache, position = prefill(
        graphdef, state, tokens, valid, cache_length=longest + config.max_new_tokens, options=options
    )
    stop_ids = jnp.asarray(list(config.stop_token_ids) or [-1], jnp.int32)
    penalty = config.repetition_penalty is not None
    seen = _seen_tokens(tokens, valid, logits.shape[-1]) if penalty else jnp.zeros((len(prompts), 0), bool)
    out, lengths, _ = decode(graphdef, state, logits, cache, position, stop_ids, seen, config=config, options=options)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[row, : lengths[row]].tolist() for row in range(len(prompts))]


def generate_text(
    model: DecoderLM,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[dict[str, Any]]],
    config: SamplingConfig = SamplingConfig(),
    *,
    chat: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
    options: ComputeOptions = ComputeOptions(),
) -> list[str]:
    """Completions for text prompts; with `chat`, each prompt is a user message (or a list of messages) rendered
    with the tokenizer's chat template (with `tools`: JSON schemas the template shows the model). Stops as
    `generate` does; a checkpoint that names no end id (no generation_config.json) also stops at the tokenizer's
    eos token. `options` as for `generate`."""
    ids = []
    for prompt in prompts:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids.append(chat_token_ids(tokenizer, messages, tools=tools))
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    defaults = model.config.generation
    named = defaults is not None and defaults.eos_token_id
    if config.stop_token_ids is None and not named and tokenizer.eos_token_id is not None:
        stop = set(model.config.eos_token_ids) | {tokenizer.eos_token_id}
        config = dataclasses.replace(config, stop_token_ids=tuple(sorted(stop)))
    return [
        tokenizer.decode(out, skip_special_tokens=True)
        for out in generate(model, ids, config, pad_token_id=tokenizer.pad_token_id, options=options)
    ]
