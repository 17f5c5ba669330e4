"""The data section: the format, its sources and columns, packing and mixtures (each format's own
rules live in :mod:`fft_dist.data.formats`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from typing import Any


class DataFormat(str, Enum):
    """The built-in names; data.format is a string checked by fft_dist.data.formats (plugins add names)."""
    text = "text"
    prompt_completion = "prompt_completion"
    chat = "chat"
    tokenized = "tokenized"
    classification = "classification"


@dataclass
class DataConfig:
    name: str | None = None
    """What logs and `fft-dist data` call this data. None: the stem of the first data file (my_set for
    data/my_set.jsonl), the folder's name for a glob or a save_to_disk folder, `mixture` for a mixture."""
    path: Any = "${asset:stdlib_docstrings.jsonl}"
    """Training data: a file, a glob, a list of files/globs, or a `save_to_disk` folder. Local only.
    The loader follows the extension: .jsonl/.json, .parquet, .csv, .txt (rows per `sample_by`), .arrow."""
    eval_path: Any = None
    """Eval data in the same forms as `path`. None: hold out `eval_fraction` of the training rows."""
    eval_fraction: float = 0.05
    """Held-out share of the training rows (fixed seed, independent of train.seed) when eval_path is None."""
    format: str = DataFormat.prompt_completion.value
    """text: loss on every token. prompt_completion: loss on the completion only. chat: `messages`
    rendered with the chat template, loss on assistant turns only. tokenized: `input_ids` (+ optional
    `labels` or `loss_mask`) used as they are. classification: `text_key` -> `label_key`, a new task head.
    Or a format a loss.plugins module registers (fft_dist.data.formats.register_format)."""
    text_key: str = "text"
    label_key: str = "label"
    """classification: the column holding each row's label (a name from `labels`)."""
    labels: list[str] = field(default_factory=list)
    """classification: the label names, class id = position. Empty: the sorted distinct training labels."""
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    """chat: the column holding the list of messages ({role, content}, tool_calls, ...). At its default a
    ShareGPT `conversations` column or Alpaca `instruction`/`input`/`output` columns are read too."""
    chat_template: str | None = None
    """chat: a Jinja template string, or a path to a .jinja file; replaces the tokenizer's own template."""
    max_length: int = 256
    """Rows are truncated to this many tokens (text with `stride`: split into windows of this size)."""
    stride: int = 0
    """text only: split a longer document into windows starting every `stride` tokens (1..max_length);
    the overlap is context only, never trained twice. 0: truncate instead."""
    packing: bool = False
    """Fill each training row with several examples up to max_length; attention stays within each
    example and position ids restart per example (eval rows stay unpacked)."""
    max_examples: int = 0
    """Use only the first N training rows (0: all). Handy for smoke tests."""
    shuffle: bool = True
    """Reshuffle the training rows every epoch (seeded by train.seed)."""
    group_by_length: int = 0
    """Unpacked, single source: sort each run of N rows of an epoch's shuffle by length, so batches pad less (0: off)."""
    cache_dir: str | None = None
    """Where the tokenised splits are kept (one folder per fingerprint: sources, tokenizer, settings).
    None: run.dir/data_cache. Point several runs at one folder to tokenise once for all of them."""
    num_proc: int = 1
    """Worker processes for tokenising (on the one rank that builds the cache)."""
    inspect_terms: list[str] = field(default_factory=list)
    """`fft-dist data`: show how each of these domain terms splits into tokens."""
    mixture: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Several weighted sources instead of `path`: name -> {path, weight, optional eval_path and other
    data.* settings for that source}. Metrics add eval_<name>_loss per source. See docs/data.md (mixtures)."""
    # tokens and documents (issue 19)
    add_bos: str = "auto"
    """text, prompt_completion: put the BOS token before each example. auto: what the tokenizer itself adds
    (its add_bos_token / post-processor: Llama 3 and Gemma yes, GPT-2 and Qwen none); true; false.
    Never twice: text that already starts with BOS gets no second one."""
    add_eos: str = "auto"
    """text, prompt_completion: end each example with the EOS token, which carries loss (the model learns to
    stop). auto: the tokenizer's own end tokens if it adds any, else its EOS token; true; false."""
    sample_by: str = "line"
    """text format, .txt sources: one row per line, per paragraph (blank-line separated) or per document
    (a whole file); the names of `datasets`' text loader. A long document is cut by `stride` or truncated."""

    # chat layout (issue 19)
    role_key: str | None = None
    """chat: the key of a message's role. None: `role`, else `from` (ShareGPT)."""
    content_key: str | None = None
    """chat: the key of a message's text. None: `content`, else `value` (ShareGPT)."""
    roles: dict[str, str] = field(default_factory=dict)
    """chat: role names as the data writes them -> system/developer/user/assistant/tool, on top of the
    ShareGPT names (human: user, gpt: assistant, observation: tool); on the command line `+data.roles={bot:assistant}`."""
    train_on: str = "assistant"
    """chat: which tokens carry the loss. assistant: every assistant turn (its text, tool calls and
    end-of-turn token); last_assistant: the last assistant turn only; all: every token."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """chat: extra variables for the template, e.g. `+data.chat_template_kwargs={enable_thinking:false}` (Qwen3)."""

    def __post_init__(self) -> None:  # DataFormat.text and "text" are one name; messages print the plain name
        self.format = self.format.value if isinstance(self.format, Enum) else self.format
        # `data.add_bos=true` arrives as a bool, typed here as "True": one spelling for every check
        self.add_bos, self.add_eos = (str(v).lower() for v in (self.add_bos, self.add_eos))
        if self.name is None and "${" not in str(self.path):  # a schema's default, before resolution: later
            self.name = default_data_name(self.path, self.mixture)


def default_data_name(path: Any, mixture: Any = None) -> str:
    """data.name when unset: the first source's file stem (its folder for a glob or a dataset folder)."""
    first = path[0] if isinstance(path, (list, tuple)) or type(path).__name__ == "ListConfig" else path
    if first is None or (isinstance(first, str) and not first):
        return "mixture" if mixture else "data"
    text = str(first).rstrip("/")
    if any(ch in text for ch in "*?["):
        text = re.split(r"[*?\[]", text, maxsplit=1)[0].rstrip("/")  # the folder above the pattern
        return PurePath(text).name or "data"
    pure = PurePath(text)
    return (pure.stem if pure.suffix else pure.name) or "data"
