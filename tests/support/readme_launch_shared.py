"""Helpers and fixtures moved unchanged from tests/test_readme_launch.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_readme_launch.py,
unit/test_readme_launch.py."""
from __future__ import annotations

import re

from doc_pages import command_lines


# Lines that name the user's own files or environment are placeholders, not run here: $VARS (the
# Kubernetes block, run with its variables set by test_container), <run> paths, `...`, ./ files.
PLACEHOLDER = re.compile(r"\$|<\w+>|\.\.\.|(^|[\s=])\./")


COMMANDS = [c for c in command_lines("fft-dist launch ") if not PLACEHOLDER.search(c)]
