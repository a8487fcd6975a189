"""Tokenizers and chat templates, through transformers' AutoTokenizer (no torch needed), also from GGUF files.

A chat template is a program (Jinja, sandboxed by transformers): one that never ends (nested loops over
`range(100000)`) would hang whoever renders it, so `apply_chat_template` bounds its time (`CHAT_TEMPLATE_SECONDS`,
by SIGALRM in the main thread: Jinja templates run as Python code, which the alarm interrupts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qlora_jax.errors import InputError

__all__ = [
    "load_tokenizer",
    "TokenIdError",
    "check_token_ids",
    "apply_chat_template",
    "ChatTemplateTimeout",
    "CHAT_TEMPLATE_SECONDS",
]

CHAT_TEMPLATE_SECONDS = 10.0  # a template renders a conversation in milliseconds; this is a runaway one


class ChatTemplateTimeout(BaseException):
    """A chat template still rendering after its time. A BaseException, so that no `except Exception` inside the
    template machinery takes it for the template's own error; callers turn it into theirs."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raises ChatTemplateTimeout in the block after `seconds` (main thread only: elsewhere, no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise ChatTemplateTimeout(
            f"the chat template did not finish rendering within {seconds:g} s (a template that never ends?)"
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def apply_chat_template(
    tokenizer: Any, messages: Sequence[dict], *, seconds: float | None = None, **kwargs: Any
) -> Any:
    """`tokenizer.apply_chat_template(messages, **kwargs)`, raising ChatTemplateTimeout after `seconds` (default:
    CHAT_TEMPLATE_SECONDS, read when called)."""
    seconds = CHAT_TEMPLATE_SECONDS if seconds is None else seconds
    with _time_limit(seconds):
        return tokenizer.apply_chat_template(list(messages), **kwargs)


# GGUF ids of the special tokens, by the tokenizer_config name transformers gives them.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time notice "PyTorch was not found. Models won't be available ...": we use its
    tokenizers only, which need no torch. Any other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


def _import_transformers() -> Any:
    """`import transformers`, without the notice above (printed to every user without torch otherwise)."""
    logger = logging.getLogger("transformers")  # transformers' library logger, which logs the notice
    notice = _NoTorchNotice()
    logger.addFilter(notice)
    try:
        import transformers
    finally:
        logger.removeFilter(notice)
    return transformers


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model directory (tokenizer.json, tokenizer_config.json, chat template) or of a GGUF file
    (rebuilt, with its chat template, from the GGUF metadata as transformers rebuilds it)."""
    AutoTokenizer = _import_transformers().AutoTokenizer  # noqa: N806

    path = Path(path)
    try:
        if path.is_file():
            return _gguf_tokenizer(path)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def _gguf_tokenizer(path: Path) -> Any:
    AutoTokenizer = _import_transformers().AutoTokenizer  # noqa: N806

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ModuleNotFoundError as e:  # transformers' GGUF reader imports torch, which a JAX install may lack
        try:
            return _gguf_tokenizer_without_torch(path)
        except ImportError:
            raise ValueError(
                f"reading a GGUF tokenizer with this transformers version needs torch ({e}); "
                "install torch, or point model.tokenizer / --tokenizer at a tokenizer directory"
            ) from e


def _gguf_tokenizer_without_torch(path: Path) -> Any:
    """transformers' own GGUF tokenizer conversion, fed with metadata read by the `gguf` package instead of
    transformers' torch-importing reader (tests: the same token ids and chat template as AutoTokenizer)."""
    import gguf

    PreTrainedTokenizerFast = _import_transformers().PreTrainedTokenizerFast  # noqa: N806
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = gguf.GGUFReader(path)
    meta = {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.") or name == "general.architecture"
    }
    grouped = {
        group: {new: meta[f"tokenizer.{old}"] for old, new in renames.items() if f"tokenizer.{old}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer:
        raise ValueError("the GGUF file holds no tokenizer (tokenizer.ggml.tokens)")
    if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary by default
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


class TokenIdError(InputError):
    """Token ids that the model has no embedding row for."""


_RESIZE = (
    "resize the embedding to the tokenizer's size (qlora_jax.tokens.resize_token_embeddings; "
    "--resize-token-embeddings on the command line) and train the new rows (docs/lora.md#added-tokens)"
)


def check_token_ids(ids: Any, vocab_size: int, where: str, *, fix: str = _RESIZE) -> None:
    """Raises TokenIdError naming the ids >= `vocab_size` (the model's embedding rows) found in `ids` (a sequence
    of integer sequences, or an integer array) and `fix`, what to do: a tokenizer with added tokens on a model
    whose embedding was not resized would otherwise index past the table (NaN losses, zeros from `generate`)."""
    import numpy as np

    flat = np.concatenate([np.asarray(row, np.int64).reshape(-1) for row in ids]) if len(ids) else np.zeros(0)
    bad = np.unique(flat[(flat >= vocab_size) | (flat < 0)])
    if bad.size:
        shown = ", ".join(map(str, bad[:8].tolist())) + (f" (and {bad.size - 8} more)" if bad.size > 8 else "")
        raise TokenIdError(
            f"{where}: token ids {shown} are outside the model's embedding of {vocab_size} rows (added "
            f"tokens the model was not resized for?); {fix}"
        )
