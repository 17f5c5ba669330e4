"""README commands as pasted. The "Running at scale" `fft-dist launch` lines each compose, pass
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
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(line)}(\s|$)", text, re.M), f"not in the README as printed: {line}"
    words = line.split()[1:]
    dry = expect == "launcher.dry_run"
    if dry:
        words.append("launcher.dry_run=true")
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", *words], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    if dry:
        assert "fft_dist.train" in proc.stdout, proc.stdout[-2000:]
    else:
        assert expect in proc.stdout, proc.stdout[-2000:]
