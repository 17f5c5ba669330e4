"""A chat row as users have it -> one conversation (messages and tools) as chat templates read it.

Layouts: OpenAI `messages` (tool_calls, tool messages with tool_call_id and name, reasoning_content,
a `tools` column), ShareGPT `conversations` (from/value; human/gpt/system/tool/observation), Alpaca
`instruction`/`input`/`output` (+ optional `system`), or any other layout through data.messages_key,
data.role_key, data.content_key and data.roles. Every key of a message is kept (a template may read
it); only the role and text keys are renamed and the role name mapped.

Nested values are carried as JSON text between loading and encoding (:func:`to_text`): tool schemas
and call arguments differ in shape from row to row, and Arrow would need one schema for all of them.
"""
from __future__ import annotations

import json
from typing import Any

from fft_dist.config import DataConfig

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function": "tool"}
"""Role names the ShareGPT layout writes -> chat roles (data.roles adds to and overrides these)."""
FUNCTION_CALL = "function_call"
"""A ShareGPT turn whose value is a tool call ({name, arguments} as JSON text): an assistant turn with tool_calls."""
SHAREGPT_COLUMN = "conversations"
ALPACA_COLUMNS = ("instruction", "output")
ALPACA_OPTIONAL = ("input", "system")
TOOLS_COLUMN = "tools"
LIST_OR_TEXT = (list, str)
"""A messages or tools value: a list, or its JSON text."""
OPTIONAL = (list, str, type(None))


def layout_columns(cfg: DataConfig, found) -> dict[str, Any]:
    """The columns a chat source is read from, given the columns it holds (a JSON row's keys, a file's schema):
    data.messages_key; at its default a ShareGPT `conversations` or Alpaca columns; plus `tools` when present."""
    found = set(found)
    default = cfg.messages_key == DataConfig.messages_key
    if cfg.messages_key in found or not default:
        out: dict[str, Any] = {cfg.messages_key: LIST_OR_TEXT}
    elif SHAREGPT_COLUMN in found:
        out = {SHAREGPT_COLUMN: LIST_OR_TEXT}
    elif set(ALPACA_COLUMNS) <= found:
        out = {c: str for c in ALPACA_COLUMNS}
        out.update({c: (str, type(None)) for c in ALPACA_OPTIONAL})
    else:
        out = {cfg.messages_key: LIST_OR_TEXT}
    out[TOOLS_COLUMN] = OPTIONAL  # kinds with None: a row or file may lack the column
    return out


class RowProblem(ValueError):
    """Why a row cannot be a conversation (the caller names the row)."""


def conversation(row: dict, cfg: DataConfig) -> tuple[list[dict], list | None]:
    """(messages, tools) of one row of :func:`layout_columns`; raises RowProblem."""
    tools = _parsed(row.get(TOOLS_COLUMN), TOOLS_COLUMN)
    if tools is not None and not isinstance(tools, list):
        raise RowProblem("tools must be a list of function schemas (or its JSON text)")
    # Sources of several layouts concatenate into one table whose other layouts' columns are null.
    key = cfg.messages_key if row.get(cfg.messages_key) is not None else SHAREGPT_COLUMN
    if row.get(key) is None and row.get("instruction") is not None:
        return _alpaca(row), tools or None
    if row.get(key) is None:
        key = cfg.messages_key
    raw = _parsed(row.get(key), key)
    if not isinstance(raw, list) or not raw:
        raise RowProblem(f"{key} must be a non-empty list of messages")
    messages = [_message(m, i, cfg) for i, m in enumerate(raw)]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("no assistant turn (chat loss falls on assistant turns only)")
    return messages, tools or None


def row_problem(row: dict, cfg: DataConfig) -> str | None:
    try:
        conversation(row, cfg)
    except RowProblem as e:
        return str(e)
    return None


def to_text(row: dict) -> dict:
    """A row with its nested values as JSON text (what the loader stores; :func:`conversation` reads both)."""
    return {k: (json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v) for k, v in row.items()}


def _parsed(value, what: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowProblem(f"{what} is text but not JSON ({e.msg} at character {e.pos})") from None
    return value


def _alpaca(row: dict) -> list[dict]:
    prompt = row["instruction"] or ""
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}" if prompt else row["input"]
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _keys(m: dict, cfg: DataConfig) -> tuple[str, str]:
    role = cfg.role_key or ("role" if "role" in m else "from")
    content = cfg.content_key or ("content" if "content" in m or "role" in m else "value")
    return role, content


def _message(m, i: int, cfg: DataConfig) -> dict:
    if not isinstance(m, dict):
        raise RowProblem(f"message {i} must be an object")
    role_key, content_key = _keys(m, cfg)
    if role_key not in m:
        raise RowProblem(f"message {i} has no {role_key!r} (set data.role_key to the key that holds the role)")
    names = {**SHAREGPT_ROLES, **dict(cfg.roles)}
    role = m[role_key]
    if role == FUNCTION_CALL and role not in names:  # LLaMA-Factory's ShareGPT: the call as JSON text
        calls = _parsed(m.get(content_key), "a function_call value")
        m = {"role": "assistant", "content": None, "tool_calls": calls if isinstance(calls, list) else [calls]}
        role_key, content_key, role = "role", "content", "assistant"
    role = names.get(role, role) if isinstance(role, str) else role
    if role not in CHAT_ROLES:
        raise RowProblem(f"message {i} has unknown role {m[role_key]!r} (known: {', '.join(CHAT_ROLES)}; "
                         "map others with data.roles, e.g. +data.roles={bot:assistant})")
    # Keys a columnar file fills with null for messages that lack them are dropped: templates test
    # `'tool_calls' in message`, and a null there is not an absent key.
    out = {k: v for k, v in m.items() if v is not None and k not in (role_key, content_key)}
    out["role"] = role
    content = m.get(content_key)
    calls = out.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise RowProblem(f"message {i} ({role}) has tool_calls; only assistant turns call tools")
        out["tool_calls"] = [_tool_call(c, i, k) for k, c in enumerate(_parsed(calls, "tool_calls") or [])]
        if not out["tool_calls"]:
            del out["tool_calls"]
    if content is None and "tool_calls" not in out:
        raise RowProblem(f"message {i} has no {content_key!r} (set data.content_key to the key that holds the "
                         "text; a null text needs tool_calls)")
    if content is not None and not isinstance(content, str):
        raise RowProblem(f"message {i} {content_key} must be a string (or null with tool_calls)")
    # null (OpenAI's tool-call turns) reaches the template as "": Qwen3's official template concatenates
    # the content unconditionally, and every template tests it with `if` or `is string`.
    out["content"] = "" if content is None else content
    return out


def _tool_call(call, i: int, k: int) -> dict:
    """The OpenAI form {type, id?, function: {name, arguments}}, with arguments an object: given as JSON text
    (as OpenAI writes them) they are parsed once, so a template's `tojson` does not encode them twice."""
    if not isinstance(call, dict):
        raise RowProblem(f"message {i} tool call {k} must be an object")
    call = {key: v for key, v in call.items() if v is not None}
    function = dict(call.get("function") or {key: call.pop(key) for key in ("name", "arguments") if key in call})
    if not isinstance(function.get("name"), str):
        raise RowProblem(f"message {i} tool call {k} has no function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise RowProblem(f"message {i} tool call {k} arguments are not JSON ({e.msg})") from None
    function["arguments"] = arguments
    return {**call, "type": call.get("type", "function"), "function": function}
