"""The README's "Running at scale" commands, as pasted: each `fft-dist launch` line composes, passes
every pre-launch check and prints what it would run (with launcher.dry_run=true added, nothing runs)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, child_env


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return section[section.index("```bash\n") + 8:section.index("```\n", section.index("```bash\n") + 8)]


def launch_commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line.startswith("fft-dist launch ")]


COMMANDS = launch_commands(readme_block("### Running at scale"))


def test_the_block_has_the_launch_examples():
    launchers = {m for c in COMMANDS for m in re.findall(r"launcher=(\w+)", c)}
    assert {"torchrun", "deepspeed", "slurm", "container"} <= launchers, COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_readme_launch_command_dry_runs_as_pasted(command, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "fft-dist").write_text(f"#!/bin/sh\nexec {sys.executable} -m fft_dist.cli \"$@\"\n")
    (bindir / "fft-dist").chmod(0o755)
    env = child_env(PATH=f"{bindir}:{os.environ['PATH']}")
    dry = "" if "launcher.dry_run=true" in command else " launcher.dry_run=true"
    proc = subprocess.run(["bash", "-c", command + dry], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), command
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("shared")), "a dry run must write nothing"


def test_readme_sweep_line_dry_runs_two_points(tmp_path):
    line = next(c for c in (ln.split("  #")[0].strip() for ln in readme_block("## Running").splitlines())
                if c.startswith("fft-dist train -m "))
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", *line.split()[1:], "launcher.dry_run=true"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multirun point 2/2" in proc.stdout and proc.stdout.count("exit 0") == 2, proc.stdout[-2000:]
