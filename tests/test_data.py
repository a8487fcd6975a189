"""The data pipeline: record formats and loss masks with SmolLM2's real tokenizer and chat template (and a tiny
word-level tokenizer with BOS), bad input named by file:line, truncation, packing vs padding, splits, batches."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qlora_jax.train.data import (
    IGNORE_INDEX,
    Batch,
    BatchIterator,
    DataError,
    Example,
    load_examples,
    pack_examples,
    pad_examples,
    read_jsonl,
    split_train_eval,
    tokenize_record,
)

transformers = pytest.importorskip("transformers")

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT = [
    {"role": "system", "content": "Answer tersely."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course.\nIt has been since 1871."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": ""},
]


@pytest.fixture(scope="session")
def smol(smol_dir):
    return transformers.AutoTokenizer.from_pretrained(smol_dir)


TINY_WORDS = "<pad> <s> </s> <unk> <system> <user> <assistant> <tool> LAST hello world how are you fine thanks what is"


def tiny_tokenizer(template: str | None = None):
    """Word-level, whitespace-split, adds BOS like Llama tokenizers do; its chat template puts BOS in the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS.split())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.chat_template = template or (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return out


@pytest.fixture(scope="session")
def tiny():
    return tiny_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def mask_runs(example: Example) -> list[np.ndarray]:
    """The tokens of each maximal run of loss_mask == True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], example.loss_mask.astype(int), [0]])))
    return [example.tokens[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]


def synthetic(lengths, seed=0) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(1, 1000, n), rng.random(n) < 0.7, f"synthetic:{i}") for i, n in enumerate(lengths)]


# ------------------------------------------------------------------------------------------------ formats


def test_text_loss_on_every_token_plus_eos(smol, tiny):
    ex = tokenize_record({"text": "Hello world, how are you?"}, smol, source="f:1")
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    # SmolLM2 adds no BOS; its EOS (the instruct GGUF's) is <|im_end|>, id 2.
    assert ex.tokens.tolist() == smol("Hello world, how are you?")["input_ids"] + [2] and ex.loss_mask.all()
    assert smol.eos_token == "<|im_end|>" and ex.source == "f:1"
    assert tokenize_record({"text": "hello"}, smol, source="f:1", add_eos=False).tokens.tolist() == [28120]
    # A tokenizer that adds BOS: BOS first, EOS last, each once.
    assert tokenize_record({"text": "hello world"}, tiny, source="f:1").tokens.tolist() == [1, 9, 10, 2]


def test_prompt_completion_loss_on_completion_and_eos(smol, tiny):
    record = {"prompt": "Q: the capital of France?\nA:", "completion": " Paris"}
    ex = tokenize_record(record, smol, source="f:1")
    prompt = smol(record["prompt"])["input_ids"]
    assert ex.tokens[: len(prompt)].tolist() == prompt and not ex.loss_mask[: len(prompt)].any()
    assert ex.loss_mask[len(prompt) :].all()
    assert smol.decode(ex.tokens[ex.loss_mask]) == " Paris<|im_end|>"
    assert tokenize_record(record, smol, source="f:1", loss_on="all").loss_mask.all()
    assert smol.decode(tokenize_record(record, smol, source="f:1", add_eos=False).tokens).endswith(" Paris")
    ex = tokenize_record({"prompt": "hello", "completion": " fine thanks"}, tiny, source="f:1")
    assert ex.tokens.tolist() == [1, 9, 14, 15, 2] and ex.loss_mask.tolist() == [0, 0, 1, 1, 1]


def test_chat_masks_exactly_the_assistant_turns_and_their_end_of_turn(smol):
    ex = tokenize_record({"messages": CHAT}, smol, source="f:1")
    # Same tokens as inference would see: the template's own tokenization.
    assert ex.tokens.tolist() == list(smol.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    assert smol.decode(ex.tokens) == smol.apply_chat_template(CHAT, tokenize=False)
    runs = [smol.decode(run) for run in mask_runs(ex)]
    assert runs == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    # The "\n" the template writes after <|im_end|> is a token of its own and is context, not a target.
    ends = np.flatnonzero(ex.tokens == 2)
    assert (ex.tokens[ends + 1] == smol("\n", add_special_tokens=False)["input_ids"][0]).all()
    assert not ex.loss_mask[ends + 1].any()
    assert tokenize_record({"messages": CHAT}, smol, source="f:1", loss_on="all").loss_mask.all()


def test_chat_default_system_prompt_and_trailing_user_turn_are_context(smol):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ex = tokenize_record({"messages": chat + [{"role": "user", "content": "Bye"}]}, smol, source="f:1")
    text = smol.decode(ex.tokens)
    assert text.startswith(SYSTEM)  # SmolLM2's template adds its system prompt when the chat has none
    assert [smol.decode(r) for r in mask_runs(ex)] == ["Hello!<|im_end|>"]
    assert text.endswith("<|im_start|>user\nBye<|im_end|>\n")


def test_chat_with_bos_in_the_template_gets_one_bos(tiny):
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"}]
    ex = tokenize_record({"messages": chat}, tiny, source="f:1")
    assert ex.tokens.tolist() == [1, 5, 9, 2, 6, 14, 15, 2]  # <s> <user> hello </s> <assistant> fine thanks </s>
    assert ex.loss_mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_chat_without_a_template_is_a_data_error(tiny):
    tok = tiny_tokenizer()
    tok.chat_template = None
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=r"^d\.jsonl:2: the chat template fails"):
        tokenize_record(record, tok, source="d.jsonl:2")


# ------------------------------------------------------------------------------------------------ bad input

GOOD = {"text": "hello"}
BAD = [
    ("{not json", r"invalid JSON"),
    ('["a", "list"]', r"expected a JSON object, got a JSON array"),
    ('"a string"', r"expected a JSON object, got a JSON string"),
    ({"input": "x", "output": "y"}, r"expected a 'text', 'prompt'/'completion' or 'messages' field"),
    ({"prompt": "x"}, r"needs 'completion'"),
    ({"completion": "x"}, r"needs 'prompt'"),
    ({"text": 3}, r"'text' must be a string, got a JSON number"),
    ({"text": ""}, r"'text' is empty"),
    ({"prompt": ["x"], "completion": "y"}, r"'prompt' must be a string, got a JSON array"),
    ({"prompt": "x", "completion": None}, r"'completion' must be a string, got a JSON null"),
    ({"prompt": "x", "completion": ""}, r"'completion' is empty"),
    ({"text": "a", "messages": []}, r"ambiguous record"),
    ({"messages": "hi"}, r"'messages' must be a non-empty array"),
    ({"messages": []}, r"'messages' must be a non-empty array"),
    ({"messages": [{"role": "user", "content": 1}]}, r"messages\[0\] must be an object with string"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, r"unknown role 'bot'"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}, r"no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"messages\[0\] is an assistant turn"),
]


@pytest.mark.parametrize("line, problem", BAD, ids=[p.split("'")[0][:30] + str(i) for i, (_, p) in enumerate(BAD)])
def test_bad_records_name_file_and_line(tmp_path, smol, line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", line, GOOD])  # line 2 blank: still counted
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: (.*\W)?{problem}"):
        load_examples(path, smol, max_length=64)


def test_read_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, "   ", {"text": "b", "id": 7}])
    assert read_jsonl(path) == [(1, {"text": "a"}), (3, {"text": "b", "id": 7})]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert read_jsonl(tmp_path / "bom.jsonl") == [(1, {"text": "a"})]
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", [""]), None, max_length=8)


def test_bad_arguments(tmp_path, tiny):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(ValueError, match="loss_on"):
        load_examples(path, tiny, max_length=8, loss_on="prompt")
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_record(GOOD, tiny, source="x:1", loss_on="assistant")
    with pytest.raises(ValueError, match="max_length"):
        load_examples(path, tiny, max_length=1)


# ------------------------------------------------------------------------------------------------ truncation


def test_truncation_keeps_the_start_and_drops_examples_without_targets(tmp_path, smol, caplog):
    long_prompt = " ".join(["word"] * 40)
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"text": " ".join(["token"] * 50)},
            {"prompt": long_prompt, "completion": " answer"},  # nothing to learn within 16 tokens: dropped
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    full = load_examples(path, smol, max_length=100)
    assert [len(e) for e in full][:1] == [51] and len(full) == 3
    with caplog.at_level(logging.WARNING, logger="qlora_jax.train.data"):
        cut = load_examples(path, smol, max_length=16)
    # The chat's default system prompt alone is longer than 16 tokens: its assistant turn is cut off too.
    assert [e.source for e in cut] == [f"{path}:1"]
    assert cut[0].tokens.tolist() == full[0].tokens[:16].tolist() and cut[0].loss_mask.all()
    assert "dropped 2 of 3 examples" in caplog.text and f"(first: {path}:2)" in caplog.text
    assert [e.source for e in load_examples(path, smol, max_length=48)] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert load_examples(path, smol, max_length=16, loss_on="all")[2].loss_mask.all()
    with pytest.raises(DataError, match=rf"^{path}:1: 51 tokens, more than max_length=16"):
        load_examples(path, smol, max_length=16, truncate=False)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(DataError, match=rf"^{path}: every one of its 2 examples has no target token within max"):
        load_examples(path, smol, max_length=16)


def test_truncated_chat_example_is_dropped_when_no_assistant_token_is_left(tmp_path, smol, caplog):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}, {"messages": CHAT[1:3]}])
    with pytest.raises(DataError, match="every one of its 2 examples"):
        load_examples(path, smol, max_length=20)
    assert len(load_examples(path, smol, max_length=20, loss_on="all")) == 2


# ------------------------------------------------------------------------------------------------ packing


def segments(batch: Batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(tokens, targets) of every segment of every row."""
    out = []
    for r in range(batch.num_rows):
        for s in range(1, batch.segment_ids[r].max() + 1):
            where = batch.segment_ids[r] == s
            out.append((tuple(batch.tokens[r, where].tolist()), tuple(batch.targets[r, where].tolist())))
    return out


def check_rows(batch: Batch, length: int) -> None:
    assert all(a.dtype == np.int32 and a.shape == (batch.num_rows, length) for a in vars(batch).values())
    for r in range(batch.num_rows):
        seg, pos, tgt, tok = batch.segment_ids[r], batch.positions[r], batch.targets[r], batch.tokens[r]
        real = seg > 0
        assert real.any() and not np.diff(real.astype(int)).clip(min=0).any()  # padding only at the end
        ids = seg[real]
        assert ids[0] == 1 and set(np.diff(ids).tolist()) <= {0, 1}  # 1, 2, 3 ... contiguous
        starts = np.concatenate([[True], np.diff(ids) != 0])
        assert (pos[real][starts] == 0).all() and (np.diff(pos[real])[~starts[1:]] == 1).all()
        assert (tgt[~real] == IGNORE_INDEX).all() and (tok[~real] == 0).all()
        # A target is the next token of the same segment; a segment's last token has none.
        t = np.flatnonzero(tgt != IGNORE_INDEX)
        assert (t < length - 1).all() and (seg[t + 1] == seg[t]).all() and (tok[t + 1] == tgt[t]).all()
        last = np.flatnonzero(real & (np.append(seg[1:], 0) != seg))
        assert (tgt[last] == IGNORE_INDEX).all()


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(8, 48))
def test_packing_invariants(lengths, length):
    examples = synthetic(lengths)
    packed = pack_examples(examples, length)
    check_rows(packed, length)
    expected = [(tuple(e.tokens[:length].tolist()), tuple(e.truncated(length).targets().tolist())) for e in examples]
    assert Counter(segments(packed)) == Counter(expected)
    assert Counter(segments(pad_examples(examples, length))) == Counter(expected)
    # First fit: every example went to the first row with room, so none fits in an earlier row's final space.
    free = (packed.segment_ids == 0).sum(axis=1)
    for r in range(1, packed.num_rows):
        sizes = np.bincount(packed.segment_ids[r])[1:]
        assert sizes.min() > free[:r].max()
    assert packed.num_rows >= -(-sum(min(n, length) for n in lengths) // length)


def test_packing_fills_rows():
    packed = pack_examples(synthetic([8] * 12 + [4] * 8), 16)
    assert packed.num_rows == 8 and (packed.segment_ids > 0).all()
    assert packed.segment_ids.max(axis=1).tolist() == [2] * 6 + [4] * 2
    # Over-long examples are cut to the row length (their start is kept).
    (long,) = synthetic([30], seed=3)
    row = pack_examples([long], 16)
    assert row.tokens[0].tolist() == long.tokens[:16].tolist() and row.num_rows == 1
    assert pack_examples([], 16).tokens.shape == (0, 16)


def test_padding_one_example_per_row():
    examples = synthetic([5, 16, 20])
    padded = pad_examples(examples, 16)
    check_rows(padded, 16)
    assert padded.segment_ids.max(axis=1).tolist() == [1, 1, 1]
    assert (padded.segment_ids > 0).sum(axis=1).tolist() == [5, 16, 16]
    assert padded.tokens[0, :5].tolist() == examples[0].tokens.tolist()


def test_packed_and_unpacked_real_examples_give_the_same_pairs(tmp_path, smol):
    records = [{"messages": CHAT}, {"messages": CHAT[1:5]}, {"text": "One two three."}]
    records += [{"prompt": f"Q{i}: what is {i} + {i}?\nA:", "completion": f" {2 * i}"} for i in range(12)]
    examples = load_examples(write_jsonl(tmp_path / "r.jsonl", records), smol, max_length=128)
    packed, padded = pack_examples(examples, 128), pad_examples(examples, 128)
    check_rows(packed, 128)
    assert packed.num_rows < padded.num_rows == len(examples)
    assert Counter(segments(packed)) == Counter(segments(padded))
    # Per example: the tokens and the (input token, target) pairs the loss sees, nothing across examples.
    for e in examples:
        pairs = [(a, b) for a, b in zip(e.tokens[:-1].tolist(), e.tokens[1:].tolist(), strict=True)]
        want = [p for p, m in zip(pairs, e.loss_mask[1:], strict=True) if m]
        assert [(a, b) for a, b in zip(e.tokens.tolist(), e.targets().tolist(), strict=True) if b >= 0] == want
    assert (packed.targets != IGNORE_INDEX).sum() == sum(e.num_targets for e in examples)


# ------------------------------------------------------------------------------------------------ split, batches


def test_split_train_eval():
    examples = synthetic([3] * 50)
    train, evals = split_train_eval(examples, eval_fraction=0.1, seed=1)
    again = split_train_eval(examples, eval_fraction=0.1, seed=1)
    assert [e.source for e in train + evals] == [e.source for e in again[0] + again[1]]
    assert len(evals) == 5 and len(train) == 45 and {id(e) for e in train}.isdisjoint(map(id, evals))
    assert sorted(e.source for e in train + evals) == sorted(e.source for e in examples)
    assert [e.source for e in train] == [e.source for e in examples if e in train]  # input order kept
    other = split_train_eval(examples, eval_fraction=0.1, seed=2)[1]
    assert [e.source for e in other] != [e.source for e in evals]
    assert len(split_train_eval(examples[:3], eval_fraction=0.01, seed=0)[1]) == 1
    assert split_train_eval(examples, eval_fraction=0, seed=0) == (examples, [])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_train_eval(examples, eval_fraction=bad, seed=0)
    with pytest.raises(ValueError, match="cannot split"):
        split_train_eval(examples[:1], eval_fraction=0.5, seed=0)


def numbered_rows(n: int) -> Batch:
    """Rows whose tokens are their own index."""
    tokens = np.repeat(np.arange(n, dtype=np.int32)[:, None], 4, axis=1)
    return Batch(tokens, tokens.copy(), np.zeros_like(tokens), np.ones_like(tokens))


def row_ids(batch: Batch) -> list[int]:
    return batch.tokens[:, 0].tolist()


def test_batch_iterator_epochs_and_wrapping():
    it = BatchIterator(numbered_rows(10), 4, seed=3)
    stream = [i for _ in range(10) for i in row_ids(next(it))]  # 40 rows: 4 epochs
    epochs = [stream[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every row once per epoch, none dropped
    assert len({tuple(e) for e in epochs}) == 4 and epochs[0] != list(range(10))  # reshuffled every epoch
    assert it.epoch == 4
    again = BatchIterator(numbered_rows(10), 4, seed=3)
    assert [row_ids(next(again)) for _ in range(10)] == [stream[i : i + 4] for i in range(0, 40, 4)]
    assert row_ids(next(BatchIterator(numbered_rows(10), 4, seed=4))) != stream[:4]
    # In order without shuffling; a batch larger than the data spans several epochs.
    assert row_ids(next(BatchIterator(numbered_rows(3), 7, seed=0, shuffle=False))) == [0, 1, 2, 0, 1, 2, 0]
    # Pinned: the order is a function of (seed, epoch) only, whatever the numpy version.
    assert row_ids(next(BatchIterator(numbered_rows(8), 8, seed=0))) == [3, 2, 1, 6, 0, 7, 4, 5]
    batch = next(iter(BatchIterator(numbered_rows(5), 2, seed=0)))
    assert all(getattr(batch, f).shape == (2, 4) for f in ("tokens", "targets", "positions", "segment_ids"))


def test_batch_iterator_resumes_exactly():
    rows = numbered_rows(7)
    reference = BatchIterator(rows, 3, seed=11)
    expected = [row_ids(next(reference)) for _ in range(12)]
    for k in range(12):
        it = BatchIterator(rows, 3, seed=11)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state()))
        fresh = BatchIterator(rows, 3, seed=11)
        fresh.restore(state)
        assert fresh.epoch == it.epoch
        assert [row_ids(next(fresh)) for _ in range(12 - k)] == expected[k:]
    with pytest.raises(ValueError, match="seed=11, not 12"):
        BatchIterator(rows, 3, seed=12).restore(state)
    with pytest.raises(ValueError, match="num_rows=7, not 8"):
        BatchIterator(numbered_rows(8), 3, seed=11).restore(state)
    with pytest.raises(ValueError, match="bad position"):
        BatchIterator(rows, 3, seed=11).restore({"epoch": 0, "index": 7})
    with pytest.raises(ValueError):
        BatchIterator(numbered_rows(0), 3, seed=0)


def test_batches_are_the_same_in_another_process():
    code = (
        "import json, numpy as np\n"
        "from qlora_jax.train.data import Batch, BatchIterator\n"
        "t = np.repeat(np.arange(13, dtype=np.int32)[:, None], 2, axis=1)\n"
        "it = BatchIterator(Batch(t, t, t, t), 5, seed=42)\n"
        "print(json.dumps([next(it).tokens[:, 0].tolist() for _ in range(6)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    it = BatchIterator(numbered_rows(13), 5, seed=42)
    assert json.loads(out) == [row_ids(next(it)) for _ in range(6)]
