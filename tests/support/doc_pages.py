"""The user-facing pages whose commands the tests run as printed: README.md, then docs/*.md."""
from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

PAGES: list[Path] = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_texts() -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8")) for p in PAGES]


def all_text() -> str:
    return "\n".join(text for _, text in page_texts())


def block_after(marker: str) -> str:
    """The first ```bash block after the first `marker`, searching README.md and then docs/*.md."""
    for _, text in page_texts():
        if marker in text:
            section = text[text.index(marker):]
            start = section.index("```bash\n") + 8
            return section[start:section.index("```\n", start)]
    raise AssertionError(f"{marker!r} is in none of {[p.name for p in PAGES]}")


def bash_blocks() -> list[tuple[Path, str]]:
    """Every ```bash block of every page, with its page."""
    return [(p, b) for p, text in page_texts() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def command_lines(prefix: str) -> list[str]:
    """The lines of every bash block (continuations joined, `  #` comments cut) that start with `prefix`,
    once each, in page order."""
    seen: list[str] = []
    for _, block in bash_blocks():
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix) and line not in seen:
                seen.append(line)
    return seen
