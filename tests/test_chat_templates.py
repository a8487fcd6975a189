"""Loss masks from real chat templates and vocabularies, against transformers as the oracle.

Templates: tests/data/chat_templates.json, each with its source (the originals of Qwen3, Qwen2.5, Llama 3 / 3.2,
Gemma / Gemma 3, Phi-3, Mistral v0.1 / v0.3, and TRL's training variants with `{% generation %}` blocks).
Vocabularies, built offline: SmolLM2-135M-Instruct's byte-level BPE (the bundled GGUF) with each family's special
tokens added, and three SentencePiece-style BPE tokenizers with byte fallback built with the `tokenizers` library
from a vocabulary trained here on the project's docs: the Llama 2 / Phi-3 / Mistral v0.1 kind (a normalizer
prepends "▁"), the Metaspace kind (transformers' non-legacy conversion, Mistral v0.3) and the Gemma kind (no
dummy prefix).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from qlora_jax.train.data import DataError, load_examples, tokenize_record

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {k: v["template"] for k, v in json.loads((ROOT / "tests/data/chat_templates.json").read_text()).items()}

# The special tokens of each family (bos, eos, the rest); Qwen's <think> tags are added tokens, not special.
FAMILIES = {
    "qwen": ("", "<|im_end|>", ["<|im_start|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "mistral": (
        "<s>",
        "</s>",
        [
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
    ),
}
FAMILY = {
    "qwen3": "qwen",
    "qwen2_5": "qwen",
    "llama3": "llama3",
    "llama3_2": "llama3",
    "gemma": "gemma",
    "gemma3": "gemma",
    "phi3": "phi3",
    "mistral_v1": "mistral",
    "mistral_v0_3": "mistral",
}

ISSUE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *ISSUE]
# What each template trains on ISSUE (decoded runs of the mask): each reply and its end-of-turn token, nothing else.
EXPECTED = {
    "qwen3": ["Hello!<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"],  # the last turn's (empty) thinking block
    "qwen2_5": ["Hello!<|im_end|>", "4<|im_end|>"],
    "llama3": ["Hello!<|eot_id|>", "4<|eot_id|>"],
    "llama3_2": ["Hello!<|eot_id|>", "4<|eot_id|>"],
    "gemma": ["Hello!<end_of_turn>", "4<end_of_turn>"],
    "gemma3": ["Hello!<end_of_turn>", "4<end_of_turn>"],
    "phi3": ["Hello!<|end|>", "4<|end|>"],
    "mistral_v1": [" Hello!</s>", " 4</s>"],
    "mistral_v0_3": [" Hello!</s>", " 4</s>"],
}
NO_SYSTEM = {"gemma", "mistral_v1"}  # templates that raise on a system message


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir):
    def make(template: str, family: str):
        bos, eos, rest = FAMILIES[family]
        tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
        tok.add_special_tokens({"additional_special_tokens": [t for t in (bos, eos, *rest) if t]})
        if family == "qwen":  # added, not special (as in Qwen's vocabulary)
            tok.add_tokens(
                ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
            )
        tok.bos_token, tok.eos_token = bos or None, eos
        tok.chat_template = template
        return tok

    return make


# ------------------------------------------------------------------------------- SentencePiece-style vocabularies


def _corpus() -> list[str]:
    lines = [
        line
        for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for line in p.read_text().splitlines()
        if line.strip()
    ]
    return lines + ["Q: What is the capital of France?\nA: Paris", "Hello! How are you? Fine, thanks. 2+2? 4"] * 20


@pytest.fixture(scope="module")
def spm_vocab():
    """A BPE vocabulary of "▁"-prefixed pieces (SentencePiece's) plus the 256 byte-fallback pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=1500, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    assert "▁Paris" in vocab
    return vocab, merges


SPM_KINDS = ("llama2", "metaspace", "gemma")


@pytest.fixture(scope="module")
def spm_tokenizer(spm_vocab):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    def make(kind: str, template: str | None = None, family: str = "mistral"):
        bos, eos, rest = FAMILIES[family]
        vocab, merges = dict(spm_vocab[0]), spm_vocab[1]
        for token in (bos, eos, *rest):
            vocab.setdefault(token, len(vocab))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        strip = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if kind == "llama2":  # Llama 2 / Phi-3 / Mistral v0.1's tokenizer.json: the normalizer prepends "▁"
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.decoder = decoders.Sequence([*strip, decoders.Strip(" ", 1, 0)])
        elif kind == "metaspace":  # transformers' non-legacy conversion: "▁" prepended to the first split only
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence([*strip, decoders.Strip(" ", 1, 0)])
        else:  # Gemma: spaces are "▁", no dummy prefix
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.decoder = decoders.Sequence(strip)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        out = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>", additional_special_tokens=rest
        )
        out.chat_template = template
        return out

    return make


def runs(example, tok) -> list[str]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], example.loss_mask.astype(int), [0]])))
    return [tok.decode(example.tokens[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def inference_tokens(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


# ------------------------------------------------------------------------------------------------ chat templates


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_template_trains_the_replies_and_their_end_of_turn_only(smol_tokenizer, name):
    tok = smol_tokenizer(TEMPLATES[name], FAMILY[name])
    for chat in (ISSUE, WITH_SYSTEM):
        if chat is WITH_SYSTEM and name in NO_SYSTEM:
            with pytest.raises(DataError, match=r"^d\.jsonl:7: the chat template fails on this conversation \("):
                tokenize_record({"messages": chat}, tok, source="d.jsonl:7")
            continue
        ex = tokenize_record({"messages": chat}, tok, source="d.jsonl:7")
        assert ex.tokens.tolist() == inference_tokens(tok, chat)  # the template's text, tokenized as in inference
        assert runs(ex, tok) == EXPECTED[name], chat
        assert tokenize_record({"messages": chat}, tok, source="d.jsonl:7", loss_on="all").loss_mask.all()


@pytest.mark.parametrize("kind", SPM_KINDS)
@pytest.mark.parametrize("name", ["phi3", "mistral_v1", "mistral_v0_3", "gemma", "gemma3", "llama3"])
def test_sentencepiece_vocabularies(spm_tokenizer, kind, name):
    tok = spm_tokenizer(kind, TEMPLATES[name], FAMILY[name])
    ex = tokenize_record({"messages": ISSUE}, tok, source="x:1")
    assert ex.tokens.tolist() == inference_tokens(tok, ISSUE)
    got = runs(ex, tok)
    # The decoder strips a leading space of a decoded run (SentencePiece's), so compare without it.
    assert [r.lstrip(" ") for r in got] == [r.lstrip(" ") for r in EXPECTED[name]], got
    # Nothing of the prompt is trained: every target token decodes inside the replies or is an end-of-turn token.
    eot = {tok.convert_tokens_to_ids(t) for t in ("<|end|>", "</s>", "<end_of_turn>", "<|eot_id|>")}
    for token in ex.tokens[ex.loss_mask]:
        assert token in eot or tok.decode([token]).strip() in "Hello!4", tok.convert_ids_to_tokens([token])


@pytest.mark.parametrize("name", ["qwen2_5", "llama3", "gemma", "phi3"])
def test_against_transformers_assistant_masks_of_trls_training_templates(smol_tokenizer, name):
    """TRL's training templates render the same text with `{% generation %}` blocks; transformers' mask on them is
    the oracle. It differs from ours only where TRL also trains layout: the newline after the end-of-turn token
    (and before the reply, for Qwen2.5) and Phi-3's final eos_token, never a token of a reply or of the prompt."""
    ours_tok = smol_tokenizer(TEMPLATES[name], FAMILY[name])
    oracle_tok = smol_tokenizer(TEMPLATES[f"{name}_training"], FAMILY[name])
    for chat in (ISSUE, WITH_SYSTEM) if name != "gemma" else (ISSUE,):
        ours = tokenize_record({"messages": chat}, ours_tok, source="x:1")
        out = oracle_tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        oracle = np.array(out["assistant_masks"], bool)
        assert ours.tokens.tolist() == list(out["input_ids"])
        assert not (ours.loss_mask & ~oracle).any()
        extra = ours.tokens[oracle & ~ours.loss_mask]
        assert all(not ours_tok.decode([t]).strip() or t == ours_tok.eos_token_id for t in extra), extra
        # and with the training template itself, the mask is transformers' own
        again = tokenize_record({"messages": chat}, oracle_tok, source="x:1")
        assert again.tokens.tolist() == list(out["input_ids"]) and again.loss_mask.tolist() == oracle.tolist()


def test_qwen3_earlier_thinking_is_stripped_and_the_last_is_trained(smol_tokenizer):
    tok = smol_tokenizer(TEMPLATES["qwen3"], "qwen")
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4"},
    ]
    ex = tokenize_record({"messages": chat}, tok, source="x:1")
    assert ex.tokens.tolist() == inference_tokens(tok, chat)
    assert "Greet back" not in tok.decode(ex.tokens)  # the template drops earlier turns' thinking
    assert runs(ex, tok) == ["Hello!<|im_end|>", "<think>\nAdd.\n</think>\n\n4<|im_end|>"]


def test_mistral_v0_3_system_prompt_moves_into_the_last_user_turn(smol_tokenizer):
    tok = smol_tokenizer(TEMPLATES["mistral_v0_3"], "mistral")
    chat = WITH_SYSTEM[:4]  # system, user, assistant, user
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\n2+2?[/INST]"
    # so the conversation up to the reply ("<s>[INST] Be brief.\n\nHi[/INST]") is no prefix of it
    assert not text.startswith(tok.apply_chat_template(chat[:2], tokenize=False))
    assert runs(tokenize_record({"messages": chat}, tok, source="x:1"), tok) == [" Hello!</s>"]
    # (with the assistant turn last, the template drops the system prompt: that is its own choice)
    assert "Be brief" not in tok.apply_chat_template(WITH_SYSTEM, tokenize=False)


def test_the_issue_record_loads(tmp_path, smol_tokenizer):
    tok = smol_tokenizer(TEMPLATES["qwen3"], "qwen")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": ISSUE}) + "\n" + json.dumps({"messages": WITH_SYSTEM}) + "\n")
    assert [runs(e, tok) for e in load_examples(path, tok, max_length=128)] == [EXPECTED["qwen3"]] * 2


def _edited(tok, old: str, new: str):
    assert old in tok.chat_template
    tok.chat_template = tok.chat_template.replace(old, new)
    return tok


def test_templates_whose_turns_cannot_be_located_are_refused(smol_tokenizer):
    record = {"messages": ISSUE}
    dropped = _edited(
        smol_tokenizer(TEMPLATES["phi3"], "phi3"), "'<|assistant|>\n' + message['content']", "'<|assistant|>\n' + 'OK'"
    )
    with pytest.raises(DataError, match=r"^f:2: the chat template does not render the content of messages\[1\]"):
        tokenize_record(record, dropped, source="f:2")
    twice = _edited(
        smol_tokenizer(TEMPLATES["phi3"], "phi3"),
        "'<|assistant|>\n' + message['content']",
        "'<|assistant|>\n' + message['content'] + message['content']",
    )
    with pytest.raises(DataError, match=r"^f:2: the chat template renders the content of messages\[1\] more than"):
        tokenize_record(record, twice, source="f:2")
    # Mistral's generation prompt is empty: an edit that changes the user's closing leaves nothing to find it by.
    closing = _edited(
        smol_tokenizer(TEMPLATES["mistral_v1"], "mistral"),
        "' [/INST]'",
        "(' [/INST]' if loop.last else ' [/INSTRUCTION]')",
    )
    with pytest.raises(DataError, match=r"^f:2: the generation prompt after messages\[0\] \(' \[/INST\]'\) is not in"):
        tokenize_record({"messages": ISSUE}, closing, source="f:2")


def test_a_hint_after_the_last_user_message_falls_back_to_the_generation_prompt(smol_dir, caplog):
    tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
    tok.chat_template = tok.chat_template.replace(
        "message['content']", "message['content'] + (' (final)' if loop.last else '')"
    )
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with caplog.at_level(logging.WARNING, logger="qlora_jax.train.chat"):
        ex = tokenize_record({"messages": chat}, tok, source="f:1")
    # The first turn follows "<|im_start|>assistant\n" (the prompt without the hint); the last is "d (final)", whose
    # end-of-turn token does not follow its content: trained without it, with a warning.
    assert runs(ex, tok) == ["b<|im_end|>", "d"]
    assert "writes no special end-of-turn token right after an assistant message (' (final)<|im_end|>" in caplog.text


# ------------------------------------------------------------------------------------------- prompt + completion

RECORD = {"prompt": "Q: What is the capital of France?\nA:", "completion": " Paris"}


@pytest.mark.parametrize("kind", ["smollm2", *SPM_KINDS])
def test_prompt_and_completion_are_tokenized_as_one_text(smol_dir, spm_tokenizer, kind):
    tok = transformers.AutoTokenizer.from_pretrained(smol_dir) if kind == "smollm2" else spm_tokenizer(kind)
    ex = tokenize_record(RECORD, tok, source="x:1")
    whole = tok(RECORD["prompt"] + RECORD["completion"])["input_ids"]
    assert ex.tokens.tolist() == whole + [tok.eos_token_id]  # the tokens of inference on the whole text
    assert tok.decode(ex.tokens[ex.loss_mask]).lstrip() == "Paris" + tok.eos_token
    assert tok.convert_ids_to_tokens(ex.tokens[ex.loss_mask].tolist())[0] in ("▁Paris", "ĠParis")  # one token, no
    # lone "▁" (the issue: "A:" + "▁" + "Paris" spelled "A:  Paris")
    assert not ex.loss_mask[: len(tok(RECORD["prompt"])["input_ids"])].any()


def test_a_token_straddling_the_boundary_is_trained(smol_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
    ex = tokenize_record({"prompt": "Hello wor", "completion": "ld, hi"}, tok, source="x:1")
    assert ex.tokens.tolist() == tok("Hello world, hi")["input_ids"] + [tok.eos_token_id]
    # " world" holds "ld", which the model has to produce: it is a target (so the whole token is)
    assert tok.decode(ex.tokens[ex.loss_mask]) == " world, hi" + tok.eos_token


# ------------------------------------------------------------------------------------------------- tool calling

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def tool_chat(content, calls=(CALL,)):
    """TRL's tool-calling conversation: a call (with `content`), its result, the answer."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": list(calls)},
        {"role": "tool", "name": "get_weather", "tool_call_id": "call00001", "content": "22C, sunny"},
        {"role": "assistant", "content": "It is 22C and sunny."},
    ]


ARGS = '{"city": "Paris"}'
QWEN_CALL = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>'
TOOL_EXPECTED = {  # what each template trains on tool_chat(None): the call and the answer, each with its end
    "qwen2_5": [f"{QWEN_CALL}<|im_end|>", "It is 22C and sunny.<|im_end|>"],
    "qwen3": [f"{QWEN_CALL}<|im_end|>", "<think>\n\n</think>\n\nIt is 22C and sunny.<|im_end|>"],
    "llama3_2": [f'{{"name": "get_weather", "parameters": {ARGS}}}<|eot_id|>', "It is 22C and sunny.<|eot_id|>"],
    "mistral_v0_3": [
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {ARGS}, "id": "call00001"}}]</s>',
        " It is 22C and sunny.</s>",
    ],
}


@pytest.mark.parametrize("name", list(TOOL_EXPECTED))
@pytest.mark.parametrize("content", [None, ""])
def test_tool_calls_and_tools_go_through_the_template(smol_tokenizer, name, content):
    """The tools reach the prompt, the call turn is rendered by the template and trained whole (with its end of
    turn), the tool result is not trained: tokens are transformers' apply_chat_template(tools=...)'s."""
    tok = smol_tokenizer(TEMPLATES[name], FAMILY[name])
    chat = tool_chat(content)
    for tools in (TOOLS, json.dumps(TOOLS)):  # a list, or the JSON string datasets store
        ex = tokenize_record({"messages": chat, "tools": tools}, tok, source="t.jsonl:1")
        oracle = tok.apply_chat_template(chat, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
        assert ex.tokens.tolist() == list(oracle)
        assert "The weather in a city." in tok.decode(ex.tokens)  # the schemas are in the prompt
        assert runs(ex, tok) == TOOL_EXPECTED[name]


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3"])
def test_tool_call_turn_with_content_and_two_calls(smol_tokenizer, name):
    tok = smol_tokenizer(TEMPLATES[name], FAMILY[name])
    second = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    chat = tool_chat("Let me check.", calls=(CALL, second))
    ex = tokenize_record({"messages": chat, "tools": TOOLS}, tok, source="t:1")
    assert ex.tokens.tolist() == list(
        tok.apply_chat_template(chat, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    )
    rome = QWEN_CALL.replace("Paris", "Rome")
    assert runs(ex, tok)[0] == f"Let me check.\n{QWEN_CALL}\n{rome}<|im_end|>"


@pytest.mark.parametrize("content", [None, "", "Let me check."])
def test_tool_calls_against_transformers_assistant_masks_of_trls_training_template(smol_tokenizer, content):
    """TRL's Qwen2.5 training template marks the tool-calling turns with `{% generation %}`: transformers' mask is
    the oracle; ours differs only by the layout newlines TRL trains too."""
    ours_tok = smol_tokenizer(TEMPLATES["qwen2_5"], "qwen")
    oracle_tok = smol_tokenizer(TEMPLATES["qwen2_5_training"], "qwen")
    chat = tool_chat(content)
    ours = tokenize_record({"messages": chat, "tools": TOOLS}, ours_tok, source="x:1")
    out = oracle_tok.apply_chat_template(
        chat, tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    oracle = np.array(out["assistant_masks"], bool)
    assert ours.tokens.tolist() == list(out["input_ids"])
    assert not (ours.loss_mask & ~oracle).any()
    assert all(not ours_tok.decode([t]).strip() for t in ours.tokens[oracle & ~ours.loss_mask])
    again = tokenize_record({"messages": chat, "tools": TOOLS}, oracle_tok, source="x:1")
    assert again.loss_mask.tolist() == oracle.tolist()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c[1].update(tool_calls=[]), r"messages\[1\].tool_calls must be a non-empty array"),
        (
            lambda c: c[1].update(tool_calls=[{"function": {"arguments": {}}}]),
            r"messages\[1\].tool_calls\[0\] must be an object",
        ),
        (
            lambda c: c[1]["tool_calls"][0]["function"].update(arguments=3),
            r"messages\[1\].tool_calls\[0\].function.arguments must be an object",
        ),
        (lambda c: c[0].update(tool_calls=[CALL]), r"messages\[0\] has tool_calls but role 'user'"),
        (lambda c: c[3].update(content=None), r"messages\[3\] must be an object with string 'role' and 'content'"),
        (lambda c: c[1].update(content=5), r"messages\[1\] 'content' must be a string or null"),
    ],
)
def test_bad_tool_records_are_named(smol_tokenizer, change, match):
    import copy

    tok = smol_tokenizer(TEMPLATES["qwen2_5"], "qwen")
    chat = copy.deepcopy(tool_chat(None))
    change(chat)
    with pytest.raises(DataError, match=r"^t:3: " + match):
        tokenize_record({"messages": chat, "tools": TOOLS}, tok, source="t:3")


def test_bad_tools_column_is_named(smol_tokenizer):
    tok = smol_tokenizer(TEMPLATES["qwen2_5"], "qwen")
    with pytest.raises(DataError, match=r"^t:1: 'tools' is a string but not JSON"):
        tokenize_record({"messages": ISSUE, "tools": "[{"}, tok, source="t:1")
    with pytest.raises(DataError, match=r"^t:1: 'tools' must be an array of JSON schemas"):
        tokenize_record({"messages": ISSUE, "tools": {"name": "x"}}, tok, source="t:1")
    with pytest.raises(DataError, match=r"^t:1: 'tools' goes with 'messages'"):
        tokenize_record({"prompt": "a", "completion": "b", "tools": TOOLS}, tok, source="t:1")
