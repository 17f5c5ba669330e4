"""data.chat_template: a Jinja string or a file, else the tokenizer's own template.

Apart from the chat format because the model layer reads the same rule (markers in the template
become tokens) and must not import the encoder for it.
"""
from __future__ import annotations

from pathlib import Path

from fft_dist.config import DataConfig
from fft_dist.errors import ConfigError

TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


def chat_template_file(value: str) -> Path | None:
    """The one rule for data.chat_template: a value ending in .jinja/.j2/.txt, or holding no '{' (so
    no Jinja), names a template file; any other value is the template itself."""
    return Path(value) if value.lower().endswith(TEMPLATE_FILE_SUFFIXES) or "{" not in value else None


def check_chat_template(cfg: DataConfig, where: str = "data") -> None:
    """Before launch: a data.chat_template that names a file names a readable one."""
    value = cfg.chat_template
    path = chat_template_file(value) if value is not None else None
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"{where}.chat_template={value!r} names a template file (it ends in .jinja/.j2/.txt or "
                          f"holds no '{{'), and {path.resolve()} is not a file; fix the path, or give the Jinja "
                          "template itself")
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}.chat_template={value!r}: {path} cannot be read as UTF-8 text ({e})") from None


def resolve_chat_template(cfg: DataConfig, tok) -> str:
    """data.chat_template (the template, or a file: :func:`chat_template_file`), else the tokenizer's own;
    none is an error."""
    value = cfg.chat_template
    if value is not None:
        path = chat_template_file(value)
        if path is None:
            return value
        check_chat_template(cfg)
        return path.read_text(encoding="utf-8")
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError("data.format=chat needs a chat template, and the tokenizer has none; set "
                          "data.chat_template to a Jinja string or a path to a .jinja file")
    return template
