"""Which tokens of a chat conversation are the assistant's: the conversation is rendered once by its chat template
and tokenized once; the loss mask comes from character spans of that one text.

Two ways to find the spans, in this order:

1. The template marks them itself with `{% generation %} ... {% endgeneration %}` (TRL's training templates,
   LFM2.5): transformers' `return_assistant_tokens_mask` gives the mask, exactly as the template says.
2. Otherwise each assistant turn is located in the rendered text. A turn starts where the generation prompt ends
   (what the template writes between the previous message's content and the reply: "<|im_end|>\\n<|im_start|>
   assistant\\n" for ChatML, "[/INST]" for Mistral), and runs through the message's content and the end-of-turn
   token: the first special or added token after the content, with only whitespace between ("<|im_end|>",
   "<|eot_id|>", "<end_of_turn>", "</s>"). What the template writes after that token (the "\\n" of ChatML and
   Gemma) is layout, not reply: generation stops at the end-of-turn token. What it writes between the generation
   prompt and the content belongs to the reply (Qwen3's "<think>\\n\\n</think>\\n\\n" on the turns after the last
   user message: the model writes that at inference too). A template that writes no such token after a reply
   gets the reply trained without one, and a warning.

   Positions come from rendering the conversation once more with an invisible marker after each message's
   content (private-use characters that no template or tokenizer treats specially): each marker must land once
   and removing them must give back the text exactly, so the template's own processing (trim, Qwen3 dropping the
   thinking of earlier turns, Mistral v0.3 moving the system prompt into the last user message) is followed, not
   guessed. The generation prompt is rendered after the conversation up to the turn, with the same marker after
   the previous message; what follows the marker there must follow that message in the full text (else the bare
   generation prompt must lie between the two contents: a template that appends a hint to the last user message).
   A template that drops or repeats a message's content, or whose prompt is not in the text it trains on, is
   refused by name, never guessed at.

A token is the assistant's when its characters overlap the turn's span (transformers' rule for generation blocks
too), so a token straddling a boundary is trained: it holds characters the model has to produce.

Tool calling follows TRL's conventions: the record's `tools` (JSON schemas) go to the template, which shows them
to the model; an assistant turn with `tool_calls` (its content a string, empty or null) is rendered by the template
(`<tool_call>` blocks, Llama 3's JSON, Mistral's `[TOOL_CALLS]`) and trained whole, from the generation prompt
through its content and its calls to the template's end-of-turn token (learned from a plain reply the template
renders: `<|im_end|>`, `<|eot_id|>`, `</s>`); `tool` messages (the results) are prompt, never trained.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from qlora_jax.errors import InputError
from qlora_jax.tokenizer import ChatTemplateTimeout, apply_chat_template

__all__ = ["ChatTemplateError", "assistant_mask", "has_generation_blocks"]

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MARK = re.compile("\ue000(\\d+)\ue001")


class ChatTemplateError(InputError):
    """The template cannot render this conversation, or its assistant turns cannot be located."""


def has_generation_blocks(template: str) -> bool:
    """Whether a chat template marks the assistant's output with `{% generation %}` blocks."""
    return bool(_GENERATION.search(template))


def _marked(content: str, k: int) -> str:
    # The marker goes before trailing whitespace, so that `| trim` and `rstrip` keep it next to the same text.
    kept = content.rstrip()
    return f"{kept}\ue000{k}\ue001{content[len(kept) :]}"


def _markable(message: dict) -> bool:
    """Whether a message's content can carry a marker without changing what the template writes around it: a
    non-empty string, or any string for a turn without tool calls (a template tests `if message.content` before
    writing the newline of a tool-calling turn's content)."""
    content = message.get("content")
    return isinstance(content, str) and (bool(content) or not message.get("tool_calls"))


def _content_ends(messages: Sequence[dict], indices: set[int], text: str, render: Callable[..., str]) -> dict[int, int]:
    """{message index: the character offset in `text` where its content ends}, for the given messages."""
    marked = [dict(m, content=_marked(m["content"], k)) if k in indices else m for k, m in enumerate(messages)]
    out = render(marked, False)
    pieces = _MARK.split(out)  # text, index, text, index, ..., text
    if "".join(pieces[::2]) != text:
        raise ChatTemplateError(
            "the chat template changes the text around a message's content when the content changes, so the "
            "assistant turns cannot be located in the rendered conversation"
        )
    ends: dict[int, int] = {}
    position = 0
    for piece, k in zip(pieces[::2], pieces[1::2], strict=False):
        position += len(piece)
        if int(k) in ends:
            raise ChatTemplateError(f"the chat template renders the content of messages[{k}] more than once")
        ends[int(k)] = position
    for k in sorted(indices - ends.keys()):
        raise ChatTemplateError(f"the chat template does not render the content of messages[{k}]")
    return ends


def _turn_start(
    messages: Sequence[dict], i: int, previous_end: int, content_end: int, text: str, render: Callable[..., str]
) -> int:
    """Where assistant turn i starts in `text`: after the generation prompt that follows messages[i - 1]."""
    prefix = [dict(m, content=_marked(m["content"], i - 1)) if k == i - 1 else m for k, m in enumerate(messages[:i])]
    pieces = _MARK.split(render(prefix, True))
    if len(pieces) != 3:
        raise ChatTemplateError(f"the chat template does not render the content of messages[{i - 1}] once")
    closing = pieces[2]  # what follows messages[i-1]'s content when it is the last message: then the prompt
    if text.startswith(closing, previous_end) and previous_end + len(closing) <= content_end:
        return previous_end + len(closing)
    # The template closes the last message differently (a hint appended to the last user message): look for the
    # generation prompt alone between the two contents.
    bare, prompted = render(messages[:i], False), render(messages[:i], True)
    common = len(_common_prefix(bare, prompted))
    prompt = prompted[common:]
    where = text.find(prompt, previous_end, content_end) if prompt else -1
    if where < 0:
        raise ChatTemplateError(
            f"the generation prompt after messages[{i - 1}] ({closing!r}) is not in the conversation between "
            f"that message and the next ({text[previous_end:content_end]!r}): the template trains on another "
            f"prompt than it generates from, so the assistant turn cannot be located"
        )
    return where + len(prompt)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _template_end_of_turn(tokenizer: Any, render: Callable[..., str]) -> int:
    """The token the template writes right after a plain reply (`<|im_end|>`, `<|eot_id|>`, `</s>`): where a
    tool-calling turn, whose calls are followed by other added tokens (`</tool_call>`), ends."""
    text = render(_PROBE, False)
    end = _content_ends(_PROBE, {1}, text, render)[1]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = _end_of_turn_ids(tokenizer)
    for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        if b <= end:
            continue
        if token in special:
            return token
        if text[a:b].strip():
            break
    raise ChatTemplateError(
        "the chat template writes no special end-of-turn token after an assistant reply, so the end of a "
        "tool-calling turn cannot be located"
    )


def assistant_mask(
    messages: Sequence[dict], tokenizer: Any, *, tools: Sequence[dict] | None = None
) -> tuple[list[int], list[bool]]:
    """(tokens, loss mask) of a conversation: its chat template's text tokenized once (no special tokens added:
    the template writes BOS and the like itself), the mask True on the assistant turns (see the module docstring).

    messages: validated {"role", "content"} objects (an assistant turn may carry `tool_calls`, its content then a
    string, empty or None) with an assistant turn that is not the first message; tools: JSON schemas passed to the
    template. Raises ChatTemplateError naming what failed (the template's own exception included).
    """
    tools = list(tools) if tools else None

    def render(conversation: Sequence[dict], generation_prompt: bool) -> str:
        try:
            return apply_chat_template(
                tokenizer, conversation, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except (Exception, ChatTemplateTimeout) as e:  # jinja errors (raise_exception), no template, a runaway one
            raise ChatTemplateError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from e

    template = _template(tokenizer)
    if has_generation_blocks(template):
        try:
            out = apply_chat_template(
                tokenizer, messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except (Exception, ChatTemplateTimeout) as e:
            raise ChatTemplateError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from e
        return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]

    text = render(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        if not _markable(messages[i - 1]):
            raise ChatTemplateError(
                f"messages[{i}] follows a tool-calling turn without content (messages[{i - 1}]), "
                "so where it starts cannot be located"
            )
    marked = {k for i in turns for k in (i - 1, i) if _markable(messages[k])}
    ends = _content_ends(messages, marked, text, render)
    calls = {i for i in turns if messages[i].get("tool_calls")}
    spans = []  # (message index, start, content end, bound: where the next marked content ends)
    for i in turns:
        bound = min((ends[k] for k in ends if k > i), default=len(text))
        start = _turn_start(messages, i, ends[i - 1], ends.get(i, bound), text, render)
        spans.append((i, start, ends.get(i, start), bound))

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    mask = [False] * len(tokens)
    end_of_turn = _end_of_turn_ids(tokenizer)
    call_end = _template_end_of_turn(tokenizer, render) if calls else None
    for i, start, content_end, bound in spans:
        if i in calls:  # content, the calls, through the template's end-of-turn token
            last = next(
                (j for j, (a, b) in enumerate(offsets) if a >= content_end and tokens[j] == call_end and b <= bound),
                None,
            )
            if last is None:
                raise ChatTemplateError(
                    f"the tool calls of messages[{i}] are not followed by the template's end-of-turn token "
                    f"{tokenizer.convert_ids_to_tokens(call_end)!r} before the next message"
                )
            for j in range(last + 1):
                if _overlaps(*offsets[j], start, offsets[last][1]) or j == last:
                    mask[j] = True
            continue
        after = len(tokens)
        for j, (a, b) in enumerate(offsets):
            if _overlaps(a, b, start, content_end):
                mask[j] = True
            elif a >= content_end:
                after = j
                break
        # The end-of-turn token: the first special or added token after the content, across whitespace only.
        for j in range(after, len(tokens)):
            a, b = offsets[j]
            if tokens[j] in end_of_turn:
                for k in range(after, j + 1):
                    mask[k] = True
                break
            if text[a:b].strip():
                _warn_no_end_of_turn(template, text[content_end : content_end + 40])
                break
        else:
            _warn_no_end_of_turn(template, text[content_end : content_end + 40])
    return tokens, mask


_warned: set[str] = set()


def _warn_no_end_of_turn(template: str, following: str) -> None:
    if template not in _warned:  # once per template: a dataset would repeat it on every record
        _warned.add(template)
        log.warning(
            "the chat template writes no special end-of-turn token right after an assistant message "
            "(%r follows it): the turn is trained without one, so the model is not taught where to stop",
            following,
        )


def _overlaps(a: int, b: int, lo: int, hi: int) -> bool:
    """Whether token characters [a, b) overlap the span [lo, hi); a token of no characters, whether it lies in it."""
    return (a < hi and b > lo) if a < b else lo <= a < hi


def _template(tokenizer: Any) -> str:
    try:
        template = tokenizer.get_chat_template()
    except Exception as e:  # no template, or several without a default
        raise ChatTemplateError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from e
    return template
