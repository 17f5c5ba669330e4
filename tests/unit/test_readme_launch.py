"""The commands of README.md and docs/*.md as pasted. Every `fft-dist launch` line composes, passes every
pre-launch check and prints what it would run (with launcher.dry_run=true added, nothing runs); every
other `fft-dist train|estimate|plan|data` line that needs no files of the user's runs as printed."""
from __future__ import annotations

import re

from doc_pages import page_texts
from helpers import REPO
from readme_launch_shared import COMMANDS


def test_the_block_has_the_launch_examples():
    launchers = {m for c in COMMANDS for m in re.findall(r"launcher=(\w+)", c)}
    assert {"torchrun", "deepspeed", "slurm", "container"} <= launchers, COMMANDS


def test_the_config_menu_names_every_group_file():
    """The README's menu table lists every conf/<group>/<option>.yaml (it went stale twice)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("### The config menu"):]
    table = table[:table.index("\n\n", table.index("| group |"))]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    missing = [f"{group.name}={option.stem}" for group in sorted((REPO / "conf").iterdir()) if group.is_dir()
               for option in sorted(group.glob("*.yaml")) if f"`{option.stem}`" not in rows.get(group.name, "")]
    assert not missing, f"not in the README's config menu: {missing}"


def test_links_between_pages_resolve():
    broken = []
    for page, text in page_texts():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http") and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


def test_architecture_lists_the_enforced_layers():
    """docs/ARCHITECTURE.md's layer table is fft_dist.LAYERS, row by row (tests/unit/test_layers.py enforces those)."""
    import fft_dist

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = [line.split("|") for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    documented = [re.findall(r"`(\w+)`", cells[2]) for cells in rows]
    assert documented == fft_dist.LAYERS, documented
