"""Shell text for dry runs, scripts and comments: every word quoted so that what is printed is what runs."""
from __future__ import annotations

import shlex


def one_line(text: str) -> bool:
    """No line break or other control character: safe inside a comment or an #SBATCH line."""
    return not any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def one_word(text: str) -> bool:
    return one_line(text) and not any(ch.isspace() for ch in text)


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A copy-pasteable shell command, every word quoted as needed (POSIX quotes: `shlex.split` reads
    it back exactly; a value holding a newline keeps it, inside its quotes)."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, *(shlex.quote(a) for a in argv)])


_C_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _ansi_c(ch: str) -> str:
    return _C_ESCAPES.get(ch) or (ch if one_line(ch) else f"\\x{ord(ch):02x}")


def comment_words(argv: list[str]) -> str:
    """`argv` as shell words on one line, for a comment that must stay one line and copy-pasteable:
    a word holding a newline or another control character is written in bash's ANSI-C quoting,
    ``$'line 1\\nline 2'``; the others as `shlex.quote` writes them."""
    return " ".join(shlex.quote(a) if one_line(a) else "$'" + "".join(map(_ansi_c, a)) + "'" for a in argv)
