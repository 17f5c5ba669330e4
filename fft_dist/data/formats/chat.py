"""data.format=chat: conversations rendered with the chat template; loss on the assistant turns (data.train_on).

The row layouts it reads are :mod:`fft_dist.data.chat_rows`; which tokens carry the loss is
:mod:`fft_dist.data.chat_spans` (one rendering of the whole conversation, any template). A row the
template refuses is skipped and counted with the template's reason; a row that is not a conversation
is an error naming it.
"""
from __future__ import annotations

from fft_dist.config import DataConfig
from fft_dist.data.chat_rows import RowProblem, conversation, layout_columns, row_problem, to_text
from fft_dist.data.chat_spans import TRAIN_ON, TemplateRefusal, labelled
from fft_dist.data.chat_template import check_chat_template, resolve_chat_template
from fft_dist.data.formats.registry import Format, register_format
from fft_dist.errors import ConfigError, DataError


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    columns = list(batch)
    kwargs = dict(enc.cfg.chat_template_kwargs)
    for k, index in enumerate(indices):
        row = {c: batch[c][k] for c in columns}
        try:
            messages, tools = conversation(row, enc.cfg)
        except RowProblem as e:
            raise DataError(f"{enc.name_row(index)}: {e}") from None
        try:
            ids, labels = labelled(enc.tok, enc.chat_template, messages, tools, kwargs, enc.cfg.train_on)
        except TemplateRefusal as e:
            enc.skip(out, str(e))
            continue
        enc.emit(out, ids, labels)


def check(cfg: DataConfig, where: str = "data") -> None:
    check_chat_template(cfg, where)
    if cfg.train_on not in TRAIN_ON:
        raise ConfigError(f"{where}.train_on={cfg.train_on!r} is not one of {', '.join(TRAIN_ON)}")
    for option in ("role_key", "content_key"):
        value = getattr(cfg, option)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}.{option}={value!r} must be a key name (or null: detect it)")
    bad = {k: v for k, v in dict(cfg.roles).items() if v not in ("system", "developer", "user", "assistant", "tool")}
    if bad:
        raise ConfigError(f"{where}.roles={bad}: a role maps to one of system, developer, user, assistant, tool")


CHAT = register_format(Format(
    "chat", encode, columns={"messages_key": list},
    options=("chat_template", "role_key", "content_key", "roles", "train_on", "chat_template_kwargs"),
    row_problem=row_problem, check=check, template=resolve_chat_template,
    source_columns=layout_columns, as_text=to_text))
