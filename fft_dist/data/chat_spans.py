"""Which tokens of a rendered conversation carry the loss, from ONE rendering of the whole conversation.

Templates such as Qwen3's render a turn differently depending on what follows it (reasoning only after
the last user message), and Mistral's put the tools and the system prompt into the last user turn, so
a conversation's beginning is not always a prefix of its rendering. Nothing here needs that property:

- a template with ``{% generation %}`` blocks: transformers' assistant-token mask, as the template marks it;
- any other template: the conversation is rendered once with every message's text between private-use
  sentinel characters, which locate each message in the rendering. An assistant turn's loss span starts
  after the template's generation header (what ``add_generation_prompt`` appends, learnt from a probe
  conversation) and ends after its end-of-turn text (what follows an assistant message in a probe), so
  the turn's reasoning, text and tool calls and its closing token train; headers, system, user and tool
  turns do not.
"""
from __future__ import annotations

import json
import re

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last_assistant", "all")
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK = re.compile("[\ue000\ue001]([0-9]+)\ue002")
_PROBE = ("\ue010", "\ue011", "\ue012")


class TemplateRefusal(ValueError):
    """The template raised on this conversation (Gemma on a system turn, Mistral on turns that do not
    alternate): the row is skipped and counted under this reason."""


def render(tok, template: str, messages: list[dict], tools, kwargs: dict, *, generation: bool = False) -> str:
    try:
        return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation, **kwargs)
    except Exception as e:  # noqa: BLE001 - the template's own refusal (raise_exception) or its bug: name it
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TemplateRefusal(f"the chat template refused the row: {first}") from None


def has_generation_blocks(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def labelled(tok, template: str, messages: list[dict], tools, kwargs: dict, train_on: str
             ) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the conversation; raises TemplateRefusal."""
    if has_generation_blocks(template):
        return _generation_mask(tok, template, messages, tools, kwargs, train_on)
    text, spans = assistant_spans(tok, template, messages, tools, kwargs)
    if train_on == "last_assistant":
        spans = spans[-1:]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on == "all":
        return ids, list(ids)
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for t, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _generation_mask(tok, template, messages, tools, kwargs, train_on):
    try:
        out = tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise TemplateRefusal(f"the chat template refused the row: {str(e).strip()[:160]}") from None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if train_on == "all":
        return ids, list(ids)
    if train_on == "last_assistant":
        last = max((i for i, m in enumerate(mask) if m), default=-1)
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        mask = [1 if first <= i <= last >= 0 else 0 for i in range(len(mask))]
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def assistant_spans(tok, template: str, messages: list[dict], tools, kwargs: dict
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(the rendering, one character span per assistant turn): header excluded, end-of-turn included."""
    header, cuts, footer = turn_edges(tok, template, kwargs)
    text = render(tok, template, messages, tools, kwargs)
    marked = render(tok, template, [_marked(m, i) for i, m in enumerate(messages)], tools, kwargs)
    clean, where = _unmark(marked)
    if clean != text:  # the template changed the marked text (e.g. trimmed around it): find it by search
        where = _search(text, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        at = where.get(i)
        if m["role"] != "assistant":
            cursor = at[1] if at else cursor
            continue
        following = min((where[j][0] for j in where if j > i), default=len(text))
        limit = at[0] if at else following
        start = _after_header(text, header, cuts, cursor, limit)
        if start is None:
            start = at[0] if at else cursor
        end_from = at[1] if at else start
        stop = text.find(footer, end_from, following) if footer else -1
        if footer and stop < 0:
            raise TemplateRefusal(f"assistant turn has no end-of-turn text {footer!r} in the rendering")
        end = stop + len(footer) if footer else end_from
        spans.append((start, end))
        cursor = end
    return text, spans


def _after_header(text: str, header: str, cuts: list[int], lo: int, hi: int) -> int | None:
    """The end of the last generation header in text[lo:hi]. Where the template renders a longer header at
    generation time than inside the conversation (Qwen3 without thinking adds an empty think block), the
    longest run of the header's whole tokens (`cuts`: where they end) that is there, if it holds at least half
    its characters."""
    for k in cuts:
        j = text.rfind(header[:k], lo, hi)
        if j >= 0:
            return j + k
    return None


_EDGES: dict[str, tuple[str, list[int], str]] = {}


def turn_edges(tok, template: str, kwargs: dict) -> tuple[str, list[int], str]:
    """(generation header, where its tokens end (longest first), end-of-turn text) of the template, from
    probe conversations (cached per template, variables and tokenizer)."""
    key = json.dumps([template, kwargs, type(tok).__name__, len(tok), str(tok.all_special_tokens)],
                     sort_keys=True, default=str)
    if key not in _EDGES:
        user = {"role": "user", "content": _PROBE[0]}
        with_prompt = render(tok, template, [user], None, kwargs, generation=True)
        without = render(tok, template, [user], None, kwargs)
        header = with_prompt[_common_prefix(tok, with_prompt, without):]
        answer = {"role": "assistant", "content": _PROBE[1]}
        two = render(tok, template, [user, answer], None, kwargs)
        three = render(tok, template, [user, answer, {"role": "user", "content": _PROBE[2]}], None, kwargs)
        after_two, after_three = two.split(_PROBE[1], 1)[-1], three.split(_PROBE[1], 1)[-1]
        footer = after_two[:_common_prefix(tok, after_two, after_three)]
        ends = [end for _, end in tok(header, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        cuts = [k for k in sorted({*ends, len(header)}, reverse=True) if k and 2 * k >= len(header)]
        _EDGES[key] = (header, cuts, footer)
    return _EDGES[key]


def _common_prefix(tok, a: str, b: str) -> int:
    """The characters of the tokens `a` and `b` begin with alike (whole tokens: '<|end|>' and '<|user|>'
    share no text, though they share their first two characters)."""
    ta = tok(a, add_special_tokens=False, return_offsets_mapping=True)
    tb = tok(b, add_special_tokens=False)["input_ids"]
    n = 0
    for x, y in zip(ta["input_ids"], tb):
        if x != y:
            break
        n += 1
    return ta["offset_mapping"][n][0] if n < len(ta["input_ids"]) else len(a)


def _marked(m: dict, i: int) -> dict:
    content = m.get("content")
    if not isinstance(content, str) or not content:
        return m
    head = ""
    if "</think>" in content:  # Qwen3 splits an inline think block off the content: mark the answer only
        cut = content.rindex("</think>") + len("</think>")
        head, content = content[:cut], content[cut:]
        while content.startswith("\n"):
            head, content = head + "\n", content[1:]
    return {**m, "content": f"{head}{_OPEN}{i}\ue002{content}{_CLOSE}{i}\ue002"}


def _unmark(marked: str) -> tuple[str, dict[int, tuple[int, int]]]:
    """The text without sentinels, and where each marked message's text lies in it."""
    out, where, opened, last, removed = [], {}, {}, 0, 0
    for match in _MARK.finditer(marked):
        out.append(marked[last:match.start()])
        pos = match.start() - removed
        i = int(match.group(1))
        if match.group(0)[0] == _OPEN:
            opened[i] = pos
        elif i in opened:
            where[i] = (opened[i], pos)
        removed += len(match.group(0))
        last = match.end()
    out.append(marked[last:])
    return "".join(out), where


def _search(text: str, messages: list[dict]) -> dict[int, tuple[int, int]]:
    where, cursor = {}, 0
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str) and content.strip():
            needle = content.strip().split("</think>")[-1].strip() or content.strip()
            j = text.find(needle, cursor)
            if j >= 0:
                where[i] = (j, j + len(needle))
                cursor = j + len(needle)
    return where
