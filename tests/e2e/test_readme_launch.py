"""The commands of README.md and docs/*.md as pasted. Every `fft-dist launch` line composes, passes every
pre-launch check and prints what it would run (with launcher.dry_run=true added, nothing runs); every
other `fft-dist train|estimate|plan|data` line that needs no files of the user's runs as printed."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from doc_pages import all_text, block_after, command_lines
from helpers import REPO, child_env
from readme_launch_shared import COMMANDS, PLACEHOLDER


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
    line = next(c for c in (ln.split("  #")[0].strip() for ln in block_after("## Running").splitlines())
                if c.startswith("fft-dist train -m "))
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", *line.split()[1:], "launcher.dry_run=true"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multirun point 2/2" in proc.stdout and proc.stdout.count("exit 0") == 2, proc.stdout[-2000:]


# README lines that need no files beyond the shipped ones, run exactly as printed. Training lines get
# launcher.dry_run=true appended (config, backend, data files and run-dir checks all run; nothing trains).
# Not here: lines that name the user's own files (/models, /data, ./chatml.jinja), which are placeholders,
# and the ones other tests run for real (quick start: .ci/run; ckpt/export: test_checkpoint_e2e;
# the classification example: test_classification; docker: test_container; wandb: test_metrics).
VERBATIM = [
    ("fft-dist estimate model=llama3_8b --gpus 1,8 --gpu-mem 80GiB", "llama3_8b"),
    ("fft-dist plan --gpus 8 --gpu-mem 80GiB model=llama3_8b", "overrides:"),
    ("fft-dist train --help", "launcher.use_deepspeed_launcher"),
    ("fft-dist train --cfg job train.lr=1e-4", "lr: 0.0001"),
    ("fft-dist train --info", "conf"),
    ("fft-dist train data=stdlib_mixture", "launcher.dry_run"),
    ("fft-dist train data=stdlib_mixture data.mixture.text.weight=0.25", "launcher.dry_run"),
    ("fft-dist train parallelism=none launcher.nproc_per_node=1", "launcher.dry_run"),
]


@pytest.mark.parametrize("line,expect", VERBATIM, ids=range(len(VERBATIM)))
def test_readme_line_runs_as_printed(line, expect, tmp_path):
    assert re.search(rf"^{re.escape(line)}(\s|$)", all_text(), re.M), f"not in README.md or docs/ as printed: {line}"
    dry = expect == "launcher.dry_run"
    out = run_as_printed(line, line.split()[1:], dry, tmp_path)
    if not dry:
        assert expect in out, out[-2000:]


def run_as_printed(line: str, words: list[str], dry: bool, cwd) -> str:
    """The command's stdout, after checking it exits 0 (a training line as a dry run that names the ranks)."""
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", *words, *(["launcher.dry_run=true"] if dry else [])],
                          cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    if dry:
        assert "fft_dist.train" in proc.stdout, proc.stdout[-2000:]
    return proc.stdout


# Every other `fft-dist train|estimate|plan|data` line of README.md and docs/*.md, so that a command moved
# between pages stays tested: run as printed, training lines with launcher.dry_run=true. Lines that name
# the user's files (/models, /data, ./chatml.jinja, ./myconf) are placeholders; the sweep has its own test.
USER_FILES = re.compile(r"(^|[\s='\[,])/(models|data)/|\.jinja\b")
# Example files the docs name by their place in the repository (tests/fixtures/...: chat rows and real chat
# templates) are not placeholders: such a line runs in a folder that holds a copy of tests/fixtures.
FIXTURES = re.compile(r"tests/fixtures/\S+")


OTHER_LINES = [c for prefix in ("fft-dist train", "fft-dist estimate", "fft-dist plan", "fft-dist data")
               for c in command_lines(prefix)
               if not PLACEHOLDER.search(c) and not USER_FILES.search(FIXTURES.sub("", c)) and " -m " not in c
               and c not in {line for line, _ in VERBATIM}]


@pytest.mark.parametrize("line", OTHER_LINES, ids=range(len(OTHER_LINES)))
def test_every_other_page_line_runs_as_printed(line, tmp_path):
    words = shlex.split(line)[1:]
    if FIXTURES.search(line):
        shutil.copytree(REPO / "tests" / "fixtures", tmp_path / "tests" / "fixtures")
    run_as_printed(line, words, words[0] == "train", tmp_path)
    assert not (tmp_path / "runs").exists(), "a dry run must write nothing"
