"""data.format=chat: a list of messages rendered with the chat template; loss on the assistant turns only.

Assistant turns are located without generation markers in the template: the conversation is rendered
prefix by prefix, and the text each assistant turn adds is what carries loss.
"""
from __future__ import annotations

from fft_dist.config import DataConfig
from fft_dist.data.chat_template import check_chat_template, resolve_chat_template
from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.data.formats.registry import Format, register_format
from fft_dist.errors import DataError

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_row_problem(messages) -> str | None:
    """Why a `messages` value cannot be a chat example (None when it can)."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        if m["role"] not in CHAT_ROLES:
            return f"message {i} has unknown role {m['role']!r} (known: {', '.join(CHAT_ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i} content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn (chat loss falls on assistant turns only)"
    return None


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    for messages, index in zip(batch[enc.cfg.messages_key], indices):
        ids, labels = _conversation(enc, messages, index)
        enc.emit(out, ids, labels)


def _conversation(enc, messages, index: int) -> tuple[list[int], list[int]]:
    problem = chat_row_problem(messages)
    if problem:
        raise DataError(f"{enc.name_row(index)}: {problem}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(enc, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = _render(enc, messages[:i], True), _render(enc, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(f"{enc.name_row(index)}: the chat template does not render a conversation's "
                            "beginning as a prefix of the whole, so assistant turns cannot be located; "
                            "use another data.chat_template")
        spans.append((len(before), len(upto)))
    tokens = enc.tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(tokens["input_ids"])
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for t, (start, _) in zip(ids, tokens["offset_mapping"])]
    return ids, labels


def _render(enc, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return enc.tok.apply_chat_template(messages, chat_template=enc.chat_template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template error is the user's to fix: name it
        raise DataError(f"data.chat_template could not render a conversation ({type(e).__name__}: {e})") from None


def _row_problem(row: dict, cfg: DataConfig) -> str | None:
    return chat_row_problem(row[cfg.messages_key])


CHAT = register_format(Format("chat", encode, columns={"messages_key": list}, options=("chat_template",),
                              row_problem=_row_problem, check=check_chat_template,
                              template=resolve_chat_template))
