"""Training data: JSONL records -> tokens with loss masks -> packed or padded rows -> endless, resumable batches.

A record is one JSON object per line, in one of three formats:

    {"text": "..."}                                  loss on every token
    {"prompt": "...", "completion": "..."}           one text; loss on the tokens holding the completion, and EOS
    {"messages": [{"role": ..., "content": ...}]}    chat template, rendered once; loss on the assistant turns
                                                     (`qlora_jax.train.chat` locates them)

A chat record may carry tools as TRL has them: `"tools": [JSON schemas]` (or that list as a JSON string), passed to
the chat template; assistant turns with `"tool_calls": [{"type": "function", "function": {"name": ...,
"arguments": {...}}}]` (content a string, "" or null) and `"tool"` messages with the results. The loss covers the
assistant turns, their tool calls included; the tool results are prompt.

Everything here is numpy and the tokenizer (a transformers tokenizer); nothing needs JAX. Every random choice is
made with a PCG64 bit generator's raw output, whose stream numpy guarantees across versions and platforms, so a
run resumed elsewhere sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qlora_jax.errors import InputError
from qlora_jax.train.chat import ChatTemplateError, assistant_mask

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "Batch",
    "read_jsonl",
    "tokenize_record",
    "load_examples",
    "pack_examples",
    "pad_examples",
    "split_train_eval",
    "BatchIterator",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # same as qlora_jax.train.loss.IGNORE_INDEX (not imported: that module needs JAX)
ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("completion", "all")
FORMATS = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",)}


class DataError(InputError):
    """Bad training data; the message starts with "file:line: "."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized record. loss_mask is True on the tokens the model is trained to predict."""

    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]
    source: str = "?"  # "file:line"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", np.asarray(self.tokens, np.int32).reshape(-1))
        object.__setattr__(self, "loss_mask", np.asarray(self.loss_mask, bool).reshape(-1))
        if self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"{self.source}: {self.tokens.size} tokens but {self.loss_mask.size} mask entries")

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def num_targets(self) -> int:
        """Tokens the loss is computed on: the first token is never predicted (nothing precedes it)."""
        return int(self.loss_mask[1:].sum())

    def truncated(self, length: int) -> Example:
        return self if len(self) <= length else Example(self.tokens[:length], self.loss_mask[:length], self.source)

    def targets(self) -> np.ndarray:
        """int32 [n]: the next token where it is a target, else IGNORE_INDEX (always at the last position)."""
        out = np.full(len(self), IGNORE_INDEX, np.int32)
        out[:-1] = np.where(self.loss_mask[1:], self.tokens[1:], IGNORE_INDEX)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """Rows of a batch, numpy arrays [batch, length]. segment_ids: 1, 2, ... per example in a row, 0 for padding."""

    tokens: np.ndarray  # int32
    targets: np.ndarray  # int32, IGNORE_INDEX where no loss
    positions: np.ndarray  # int32, restarting at 0 for every segment
    segment_ids: np.ndarray  # int32

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, rows: np.ndarray | Sequence[int]) -> Batch:
        rows = np.asarray(rows, np.int64)
        return Batch(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


# --------------------------------------------------------------------------------------------------- reading


def check_data_file(path: str | os.PathLike, field: str = "data") -> None:
    """DataError unless `path` is a regular file (or does not exist: opening it says so). A named pipe (FIFO), a
    shell's `<(...)` or /dev/stdin would hang the run or be empty the second time: the data is read twice (for its
    checksum, then for its records)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = (
            "a named pipe (FIFO) or a pipe"
            if stat.S_ISFIFO(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "a device or socket"
        )
        raise DataError(
            f"{path}: {field} is {kind}, not a regular file; the data is read more than once (its "
            "checksum, then its records): save it to a file first"
        )


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(1-based line number, record) of every non-blank line; anything but a JSON object is a DataError."""
    check_data_file(path)
    records = []
    with open(path, "rb") as f:  # bytes, so that a decoding error can name its line too
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got a JSON {_json_type(record)}")
            if "\\ud" in line.lower():  # JSON may escape half of a UTF-16 surrogate pair, which is no text
                try:
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(
                        f"{path}:{number}: a string holds a lone UTF-16 surrogate (\\uD800-\\uDFFF), which is not text"
                    ) from None
            records.append((number, record))
    return records


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ tokenizing


def _encode(tokenizer: Any, text: str, *, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and each token's character span in it ((0, 0) for tokens the tokenizer adds)."""
    encoding = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    eos = tokenizer.eos_token_id
    # Some tokenizers append EOS as a special token of their own; EOS is added (or not) here, by add_eos.
    if special and eos is not None and ids and ids[-1] == eos:
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not plain or plain[-1] != eos:
            ids.pop()
            offsets.pop()
    return ids, offsets


def _string(record: dict, key: str, source: str, *, nonempty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: '{key}' must be a string, got a JSON {_json_type(value)}")
    if nonempty and not value:
        raise DataError(f"{source}: '{key}' is empty")
    return value


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")


def tokenize_record(
    record: dict, tokenizer: Any, *, source: str, loss_on: str = "completion", add_eos: bool = True
) -> Example:
    """The tokens and loss mask of one record (see the module docstring); bad records raise DataError."""
    _check_loss_on(loss_on)
    formats = [name for name, keys in FORMATS.items() if any(k in record for k in keys)]
    if not formats:
        raise DataError(
            f"{source}: expected a 'text', 'prompt'/'completion' or 'messages' field, found {sorted(record) or 'none'}"
        )
    if len(formats) > 1:
        raise DataError(f"{source}: ambiguous record, has fields of several formats ({', '.join(formats)})")
    if formats[0] != "messages" and record.get("tools") is not None:
        raise DataError(
            f"{source}: 'tools' goes with 'messages' (the chat template shows them), not with {formats[0]} records"
        )
    if formats[0] == "messages":
        tokens, mask = _tokenize_chat(record, tokenizer, source)
    else:
        if formats[0] == "text":
            tokens, _ = _encode(tokenizer, _string(record, "text", source, nonempty=True), special=True)
            mask = [True] * len(tokens)
        else:
            for key in ("prompt", "completion"):
                if key not in record:
                    raise DataError(f"{source}: a prompt/completion record needs '{key}' too")
            prompt = _string(record, "prompt", source)
            completion = _string(record, "completion", source, nonempty=True)
            # One text, tokenized once: the tokens are those of inference on prompt + completion. A token is a
            # target when it holds a character of the completion (one straddling the boundary is a target too).
            tokens, offsets = _encode(tokenizer, prompt + completion, special=True)
            mask = [end > len(prompt) for _, end in offsets]
        if add_eos and tokenizer.eos_token_id is not None:
            tokens, mask = tokens + [tokenizer.eos_token_id], mask + [True]
    if loss_on == "all":
        mask = [True] * len(tokens)
    return Example(np.array(tokens, np.int32), np.array(mask, bool), source)


def _tool_calls(calls: Any, where: str) -> None:
    """TRL's / transformers' tool calls: a non-empty list of {"type": "function", "function": {"name": str,
    "arguments": an object or a JSON string}} (the template renders them)."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}.tool_calls must be a non-empty array of tool calls, got a JSON {_json_type(calls)}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(
                f"{where}.tool_calls[{j}] must be an object with a 'function' object holding a string "
                "'name' (and its 'arguments')"
            )
        if not isinstance(function.get("arguments", {}), dict | str):
            raise DataError(f"{where}.tool_calls[{j}].function.arguments must be an object (or a JSON string)")


def _tools(record: dict, source: str) -> list[dict] | None:
    """The record's `tools` column: JSON schemas as a list, or that list as a JSON string (how datasets with
    varied schemas store it); None when absent."""
    tools = record.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: 'tools' is a string but not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{source}: 'tools' must be an array of JSON schemas (objects), got {_json_type(tools)}")
    return tools or None


def _tokenize_chat(record: dict, tokenizer: Any, source: str) -> tuple[list[int], list[bool]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty array of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{source}: messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{source}: messages[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
            )
        if "tool_calls" in m and m["tool_calls"] is not None:
            if m["role"] != "assistant":
                raise DataError(
                    f"{source}: messages[{i}] has tool_calls but role {m['role']!r}; only assistant turns call tools"
                )
            _tool_calls(m["tool_calls"], f"{source}: messages[{i}]")
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise DataError(f"{source}: messages[{i}] 'content' must be a string or null")
        elif not isinstance(m.get("content"), str):
            raise DataError(f"{source}: messages[{i}] must be an object with string 'role' and 'content'")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{source}: 'messages' has no assistant turn to train on")
    if turns[0] == 0:
        # Nothing precedes it to prompt it: there is no generation prompt to find its start by.
        raise DataError(f"{source}: messages[0] is an assistant turn; a conversation must open with another role")
    try:
        return assistant_mask(messages, tokenizer, tools=_tools(record, source))
    except ChatTemplateError as e:
        raise DataError(f"{source}: {e}") from e


def load_examples(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    max_length: int,
    loss_on: str = "completion",
    add_eos: bool = True,
    truncate: bool = True,
) -> list[Example]:
    """Every record of a JSONL file, tokenized and cut to max_length tokens (the start is kept; with
    truncate=False an over-long record is a DataError). Examples left without target tokens are dropped, with a
    warning; if that leaves none at all, DataError."""
    _check_loss_on(loss_on)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    records = read_jsonl(path)
    if not records:
        raise DataError(f"{path}: no records")
    examples, dropped = [], []
    for number, record in records:
        example = tokenize_record(record, tokenizer, source=f"{path}:{number}", loss_on=loss_on, add_eos=add_eos)
        if len(example) > max_length:
            if not truncate:
                raise DataError(f"{example.source}: {len(example)} tokens, more than max_length={max_length}")
            example = example.truncated(max_length)
        if example.num_targets == 0:
            dropped.append(example.source)
        else:
            examples.append(example)
    if dropped:
        log.warning(
            "%s: dropped %d of %d examples with no target token within max_length=%d (first: %s)",
            path,
            len(dropped),
            len(records),
            max_length,
            dropped[0],
        )
    if not examples:
        raise DataError(
            f"{path}: every one of its {len(records)} examples has no target token within "
            f"max_length={max_length} (first: {dropped[0]})"
        )
    return examples


# ------------------------------------------------------------------------------------------ packing, padding


def _rows(rows: list[list[Example]], length: int) -> Batch:
    shape = (len(rows), length)
    tokens, positions, segment_ids = (np.zeros(shape, np.int32) for _ in range(3))
    targets = np.full(shape, IGNORE_INDEX, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, 1):
            span = slice(start, start + len(example))
            tokens[r, span] = example.tokens
            # Per example, so the last token of a segment never predicts the next segment's first.
            targets[r, span] = example.targets()
            positions[r, span] = np.arange(len(example))
            segment_ids[r, span] = segment
            start += len(example)
    return Batch(tokens, targets, positions, segment_ids)


def pad_examples(examples: Sequence[Example], length: int) -> Batch:
    """One example per row (cut to `length`), right-padded: token 0, segment 0, no target."""
    return _rows([[e.truncated(length)] for e in examples], length)


def pack_examples(examples: Sequence[Example], length: int) -> Batch:
    """Examples (cut to `length`) packed into rows of `length` tokens, first-fit decreasing: longest first, each
    into the first row with room for it. Attention stays within a segment (segment_ids), positions restart."""
    examples = [e.truncated(length) for e in examples if len(e)]
    sizes = np.array([len(e) for e in examples], np.int64)
    # A max-segment-tree over the rows' free space finds the first row with room in O(log rows).
    leaves = 1 << max(len(examples) - 1, 0).bit_length()
    free = [length] * (2 * leaves)
    rows: list[list[Example]] = []
    for i in np.argsort(-sizes, kind="stable"):
        n, node = int(sizes[i]), 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        row = node - leaves
        if row == len(rows):
            rows.append([])
        rows[row].append(examples[i])
        free[node] -= n
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return _rows(rows, length)


# ------------------------------------------------------------------------------------------ splits, batches


def _permutation(n: int, seed: int) -> np.ndarray:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # Sorting raw PCG64 output: unlike Generator.permutation, stable across numpy versions (NEP 19).
    return np.argsort(np.random.PCG64(seed).random_raw(n), kind="stable")


def split_train_eval(
    examples: Sequence[Example], *, eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random split; both parts keep the input order. At least one example on each side if 0 < fraction."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = 0 if eval_fraction == 0 else min(max(round(n * eval_fraction), 1), n - 1)
    if eval_fraction > 0 and n_eval < 1:
        raise ValueError(f"cannot split {n} example(s) into train and eval")
    is_eval = np.zeros(n, bool)
    is_eval[_permutation(n, seed)[:n_eval]] = True
    train = [e for e, v in zip(examples, is_eval, strict=True) if not v]
    return train, [e for e, v in zip(examples, is_eval, strict=True) if v]


class BatchIterator:
    """Endless batches of `batch_size` rows. Epoch e visits every row once, in an order seeded by seed + e; a batch
    that runs past the end of an epoch takes the rest from the next, so no row is ever skipped. Resumable:
    state() is JSON, and restore(state) in a fresh iterator continues with exactly the batches that followed."""

    def __init__(self, rows: Batch, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if rows.num_rows == 0:
            raise ValueError("no rows to batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self._epoch, self._index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row order), cached

    @property
    def epoch(self) -> int:
        """The epoch the next row comes from."""
        return self._epoch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            n = self.rows.num_rows
            order = _permutation(n, self.seed + self._epoch) if self.shuffle else np.arange(n)
            self._order = (self._epoch, order)
        return self._order[1]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        picked, need = [], self.batch_size
        while need:  # more than one epoch boundary when batch_size > rows
            order = self._epoch_order()
            part = order[self._index : self._index + need]
            picked.append(part)
            need -= len(part)
            self._index += len(part)
            if self._index == len(order):
                self._epoch, self._index = self._epoch + 1, 0
        return self.rows.take(np.concatenate(picked))

    def state(self) -> dict:
        return {
            "epoch": self._epoch,
            "index": self._index,
            "num_rows": self.rows.num_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def restore(self, state: dict) -> None:
        # The position means nothing for other rows or another order: refuse it rather than resume wrong.
        for key, mine in (("num_rows", self.rows.num_rows), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot restore data state: it was saved with {key}={state[key]!r}, not {mine!r}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.rows.num_rows:
            raise ValueError(f"cannot restore data state: bad position epoch={epoch}, index={index}")
        self._epoch, self._index = epoch, index
