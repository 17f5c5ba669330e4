"""What a data format is, and the one registry every format (built-in or a user's plugin) goes through.

Why one descriptor: a format's behaviour used to be spread over an enum, an if-chain in the encoder,
a hand-kept table of the columns each format reads and an if in the loss. Here a format is one
:class:`Format` in one module, and the pre-launch checks, the encoder, the cache fingerprint and
the loss all read it. The registry imports only the config, so the launcher's checks stay cheap.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fft_dist.config import DataConfig
from fft_dist.errors import ConfigError

OBJECTIVES = ("tokens", "examples")
"""The loss objectives a format can name (fft_dist.loss.objective_for maps them to an Objective)."""


@dataclass(frozen=True)
class Format:
    """One data format: the columns it reads, how it encodes a batch of rows, and its objective."""

    name: str
    """What users type: data.format=<name>."""
    encode: Callable[[Any, dict, list, dict], None]
    """(encoder, batch of rows, their indices, out): append one output row per example (or window)
    with the encoder's emit helpers (:class:`fft_dist.data.encode.Encoder`)."""
    columns: Mapping[str, type] = field(default_factory=dict)
    """data.<option> naming a column this format reads -> the Python type a JSON row holds there."""
    fixed_columns: Mapping[str, type] = field(default_factory=dict)
    """Columns read under their own name (no data.* option renames them) -> their Python type."""
    optional_columns: tuple[str, ...] = ()
    """Columns kept when present (tokenized: labels, loss_mask)."""
    options: tuple[str, ...] = ()
    """Other data.* options only this format reads (text: stride); set for another format, they are refused."""
    objective: str = "tokens"
    """The loss it trains with: 'tokens' (next-token cross-entropy over its labels) or 'examples'."""
    row_problem: Callable[[dict, DataConfig], str | None] | None = None
    """Pre-launch check of one JSON row beyond its column types: why it cannot be an example, or None."""
    check: Callable[[DataConfig, str], None] | None = None
    """Pre-launch check of the settings (cfg, the key prefix errors name), e.g. a template file exists."""
    template: Callable[[DataConfig, Any], str | None] | None = None
    """(cfg, tokenizer) -> the text a row is rendered with (chat: the template); part of the cache fingerprint."""
    label_set: Callable[[DataConfig, Any, list], list[str]] | None = None
    """(cfg, dataset, training row indices) -> the class names (classification)."""
    packing: str | None = None
    """Why data.packing cannot apply to this format; None: it packs."""
    source_columns: Callable[[DataConfig, Any], dict[str, Any]] | None = None
    """(cfg, the columns a source or JSON row holds) -> the columns to read and their Python type(s), where
    they depend on the layout found (chat: `messages`, ShareGPT `conversations` or Alpaca columns, and an
    optional `tools`); None: :meth:`column_names`."""
    as_text: Callable[[dict], dict] | None = None
    """JSON sources: a checked row -> the row as stored, nested values as JSON text (chat: tool schemas
    and arguments differ in shape from row to row, and Arrow needs one schema); `encode` parses them."""

    def column_names(self, cfg: DataConfig) -> dict[str, type]:
        """The columns a row must hold under `cfg` (option-named first), with their Python types."""
        return {**{getattr(cfg, option): kind for option, kind in self.columns.items()}, **self.fixed_columns}

    def columns_in(self, cfg: DataConfig, found) -> dict[str, Any]:
        """The columns to read from a source that holds the columns `found`."""
        return self.source_columns(cfg, found) if self.source_columns is not None else self.column_names(cfg)


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make data.format=<fmt.name> available. Call it at import time of your module, and name the module
    in loss.plugins so every rank (and the launcher's checks) imports it."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", fmt.name):
        raise ValueError(f"data format name {fmt.name!r}: use lower-case letters, digits and _")
    if fmt.objective not in OBJECTIVES:
        raise ValueError(f"data format {fmt.name!r}: objective {fmt.objective!r} is not one of {OBJECTIVES}")
    unknown = [o for o in (*fmt.columns, *fmt.options) if o not in DataConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"data format {fmt.name!r} reads {unknown}, which are not data.* options")
    if fmt.name in _FORMATS and _FORMATS[fmt.name] != fmt:
        raise ValueError(f"data format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def registered_formats() -> list[str]:
    return sorted(_FORMATS)


def get_format(name: str, where: str = "data") -> Format:
    """The format data.format names; an unknown name is a ConfigError naming `where`.format (a mixture's
    entry: data.mixture.<name>) and the registered formats."""
    fmt = _FORMATS.get(name)  # DataFormat members hash and compare as their names
    if fmt is None:
        raise ConfigError(f"{where}.format={getattr(name, 'value', name)!r} is not a data format; registered: {', '.join(registered_formats())} "
                          "(a format of your own: register_format in a module named in loss.plugins)")
    return fmt


def all_formats() -> list[Format]:
    """Every registered format, in registration order (the built-ins first)."""
    return list(_FORMATS.values())
