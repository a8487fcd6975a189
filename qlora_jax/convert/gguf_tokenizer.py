"""A model's tokenizer in a GGUF file's `tokenizer.*` fields, as llama.cpp reads them (for `save_gguf`).

Either copied field by field from another GGUF file of the same vocabulary (the model's source GGUF, say), or
converted from a transformers byte-level BPE tokenizer (GPT-2 style: Llama 3, Qwen, SmolLM, ...) the way
llama.cpp's `convert_hf_to_gguf.py` converts it (`_set_vocab_gpt2`): tokens and their types, the pre-tokenizer
recognised by the hash of the ids it gives a fixed text, and gguf-py's `SpecialVocab` for merges, special ids,
add_bos / add_eos and the chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from qlora_jax.models import ModelConfig
from qlora_jax.models.config_files import GGUFError, open_gguf
from qlora_jax.models.generation_config import GGUF_END_KEYS

__all__ = ["add_tokenizer", "add_end_ids", "end_ids", "tokenizer_kind"]

log = logging.getLogger(__name__)

# tokenizer.ggml.pre: llama.cpp recognises a BPE pre-tokenizer by the hash of the ids it gives this text; the
# text and the hashes are those of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre), for the tokenizers of
# the families exported here.
_PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 to 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # Phi-4
}


def add_tokenizer(writer: gguf.GGUFWriter, config: ModelConfig, tokenizer: Any, tokenizer_gguf: Any) -> None:
    """Writes the `tokenizer.*` fields: copied from the GGUF file `tokenizer_gguf` if given, else converted from the
    transformers tokenizer `tokenizer`; with neither, only bos / eos / pad ids from `config` (llama.cpp then refuses
    the file). Raises GGUFError for a tokenizer that cannot be converted or copied, or another vocabulary size."""
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf), config.vocab_size)
    elif tokenizer is not None:
        _convert_tokenizer(writer, tokenizer, config)
    else:
        log.warning("GGUF export without a tokenizer: llama.cpp will refuse the file (pass tokenizer=...)")
        _add_special_ids(writer, config)
    add_end_ids(writer, config, tokenizer)


def end_ids(config: ModelConfig) -> tuple[int, ...]:
    """The ids that end generation: the checkpoint's generation defaults' (generation_config.json), else
    config.json's eos_token_id."""
    if config.generation is not None and config.generation.eos_token_id:
        return config.generation.eos_token_id
    return config.eos_token_ids


def add_end_ids(writer: gguf.GGUFWriter, config: ModelConfig, tokenizer: Any = None) -> None:
    """llama.cpp's end-of-generation keys for every end id (`end_ids`) the tokenizer fields written so far lack:
    `tokenizer.ggml.eos_token_id` first, then `eot_token_id` (end of turn) and `eom_token_id` (end of message;
    the id whose token is `<|eom_id|>` goes there). llama.cpp stops at each of them, as transformers stops at every
    id of generation_config.json's eos_token_id. An id left over (more than three) gets a warning: llama.cpp then
    stops at it only if it recognises the token's text as an end token."""
    written = {key: value.value for key, value in writer.kv_data[0].items() if key in GGUF_END_KEYS.values()}
    missing = [i for i in end_ids(config) if i not in written.values() and 0 <= i < config.vocab_size]
    free = [kind for kind in GGUF_END_KEYS if GGUF_END_KEYS[kind] not in written]

    def text(token_id: int) -> str | None:
        return None if tokenizer is None else tokenizer.convert_ids_to_tokens(token_id)

    for token_id in sorted(missing, key=lambda i: text(i) == "<|eom_id|>"):  # eom last, into the last free key
        kind = "eom" if text(token_id) == "<|eom_id|>" and "eom" in free else (free[0] if free else None)
        if kind is None:
            log.warning(
                "end id %d (%r) has no GGUF key left (eos, eot and eom are taken): llama.cpp stops at it only "
                "if it recognises its text as an end token",
                token_id,
                text(token_id),
            )
            continue
        free.remove(kind)
        writer.add_uint32(GGUF_END_KEYS[kind], token_id)


def _add_special_ids(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """bos / eos / pad from the model config, so that `load_pretrained` gets them back."""
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        writer.add_eos_token_id(config.eos_token_ids[0])
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Every `tokenizer.*` field of another GGUF file, with its stored type (strings as their raw bytes)."""
    try:
        reader = open_gguf(source)
    except GGUFError as e:
        raise GGUFError(f"{source}: cannot read the tokenizer GGUF: {e.__cause__ or e}") from e
    fields = {key: field for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    tokens = fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise GGUFError(f"{source}: no {gguf.Keys.Tokenizer.LIST!r} to copy")
    if len(tokens.data) != vocab_size:
        raise GGUFError(
            f"{source}: its tokenizer has {len(tokens.data)} tokens, the model's embedding {vocab_size} rows"
        )
    for key, field in fields.items():
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                raise GGUFError(f"{source}: cannot copy the nested array {key!r}")
            if sub == gguf.GGUFValueType.STRING:
                values: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, values, main, sub_type=sub)
        elif main == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), main)
        else:
            writer.add_key_value(key, field.parts[field.data[0]].tolist()[0], main)


def _convert_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: ModelConfig) -> None:
    """A byte-level BPE tokenizer as convert_hf_to_gguf.py's `_set_vocab_gpt2` writes it; gguf-py's SpecialVocab
    reads merges, special ids, add_bos / add_eos and the chat template from the saved tokenizer files."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            tokenizer.save_pretrained(directory)
        except (AttributeError, OSError, TypeError, ValueError) as e:
            raise GGUFError(f"cannot save the tokenizer to convert it: {e}") from e
        kind = tokenizer_kind(Path(directory) / "tokenizer.json")
        if kind != "byte-level BPE":
            raise GGUFError(
                f"cannot convert a {kind} tokenizer to GGUF (only byte-level BPE ones, as in Llama 3, Qwen or "
                "SmolLM); pass tokenizer_gguf= a GGUF file of the base model, whose tokenizer is copied"
            )
        tokens, types = _bpe_vocabulary(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # SpecialVocab falls back to config.json for the special ids the tokenizer files do not name
        special_ids = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
        special_ids["eos_token_id"] = config.eos_token_ids[0] if config.eos_token_ids else None
        (Path(directory) / "config.json").write_text(json.dumps(special_ids))
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config.vocab_size)
    # Whether to add bos / eos, where the saved files do not say (transformers' tokenizers built from a GGUF keep
    # no add_bos_token): what the tokenizer itself does.
    ids = tokenizer.encode("a")
    for kind, position in (("bos", 0), ("eos", -1)):
        if (token_id := special.special_token_ids.get(kind)) is not None:
            special.add_special_token.setdefault(kind, bool(ids) and ids[position] == token_id)
    special.add_to_gguf(writer, quiet=True)


def tokenizer_kind(tokenizer_json: Path) -> str:
    """ "byte-level BPE" for what `add_tokenizer` converts, else a description of the kind for the error."""
    if not tokenizer_json.is_file():
        return "slow (no tokenizer.json)"
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "byte-level BPE"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "SentencePiece-style (byte-fallback BPE)"
    return str(model.get("type", "unknown"))


def _bpe_vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for every embedding row, unused rows as `[PAD{i}]` (get_vocab_base)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(vocab.values())}, the model's embedding {vocab_size} rows")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token_type = TokenType.NORMAL
        if token in added:
            info = decoder.get(i)
            if info is not None and not info.normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if (info is not None and info.special) or _looks_special(token):
                token_type = TokenType.CONTROL
            else:
                token, token_type = token.replace("\u2581", " "), TokenType.USER_DEFINED
        tokens.append(token)
        types.append(token_type)
    return tokens, types


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>") or (token.startswith(("<|", "<｜")) and token.endswith(("|>", "｜>")))


def _pre_tokenizer(tokenizer: Any) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(_PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(digest)
    if pre is None:
        log.warning(
            "unknown BPE pre-tokenizer (hash %s): written as 'default'; llama.cpp may split text differently from "
            "transformers (pass tokenizer_gguf= a GGUF of the base model to copy its tokenizer instead)",
            digest,
        )
        return "default"
    return pre
