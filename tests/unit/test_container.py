"""Containers: docker/Dockerfile.cpu is built with podman, unchanged, and runs the default job; the
CUDA docker/Dockerfile is checked by a parser (no GPU base image can be pulled here).

The podman tests (slow) install podman, runc and debootstrap when they are missing (root +
apt-get), make a Debian base image with debootstrap (kept as localhost/debian-py:bookworm and
reused), and run the README's own `docker build` / `docker run` lines through a `docker` shell
function that calls podman. Podman gets a private containers.conf (CONTAINERS_CONF) with the two
settings this kind of machine needs, so a user's /etc/containers/containers.conf is never touched.
Where any of that is impossible the tests are skipped with the reason printed. The image they
build is removed afterwards; the base image stays as the cache.
"""
from __future__ import annotations

import json
import re

import pytest

from helpers import REPO


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            pending = ""
    return out


def dockerfile_problems(text: str) -> list[str]:
    """What a fft-dist Dockerfile must do, as a list of violations (empty: fine)."""
    ins = dockerfile_instructions(text)
    words = [w for w, _ in ins]
    problems = []
    if "FROM" not in words:
        return ["no FROM"]
    first_from = words.index("FROM")
    args_before = dict(a.partition("=")[::2] for w, a in ins[:first_from] if w == "ARG")
    base = ins[first_from][1].split()[0]
    if base not in ("${BASE}", "$BASE") or not args_before.get("BASE"):
        problems.append(f"FROM {base}: the base must be the build ARG BASE with a default image")
    users = [a for w, a in ins if w == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"USER {users[-1] if users else '(none)'}: must run as a non-root user")
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    if not entry or json.loads(entry[-1]) != ["fft-dist"]:
        problems.append(f"ENTRYPOINT {entry}: must be [\"fft-dist\"] (exec form)")
    runs = [a for w, a in ins if w == "RUN"]
    pip = [cmd for run in runs for cmd in re.split(r"&&|;", run) if "pip install" in cmd]
    if any(re.search(r"\s(-e|--editable)\b", cmd) for cmd in pip):
        problems.append("an editable pip install: fft-dist must be a normal package (its wheel carries conf/)")
    copied = " ".join(a for w, a in ins if w == "COPY")
    if not all(re.search(rf"(^|\s){name}(\s|$)", copied) for name in ("fft_dist", "conf", "pyproject.toml")):
        problems.append(f"COPY {copied}: fft_dist/, conf/ (fft_dist/conf links to it) and pyproject.toml "
                        "must be copied in to be installed")
    if not any(re.search(r"pip install (-\S+ )*/\S*fft-dist\S*", cmd) for cmd in pip):
        problems.append("no `pip install <the copied fft-dist sources>`")
    torch_at = next((i for i, c in enumerate(pip) if "torch==2.13.0" in c), None)
    ds_at = next((i for i, c in enumerate(pip) if "deepspeed" in c), None)
    if torch_at is None:
        problems.append("torch is not pinned to 2.13.0")
    if ds_at is None or "--no-build-isolation" not in pip[ds_at] or (torch_at is not None and ds_at < torch_at):
        problems.append("deepspeed must be installed with --no-build-isolation, after torch")
    volumes = [v for w, a in ins if w == "VOLUME" for v in (json.loads(a) if a.startswith("[") else a.split())]
    workdir = [a for w, a in ins if w == "WORKDIR"]
    if not workdir or not any(workdir[-1] == v or workdir[-1].startswith(v.rstrip("/") + "/") for v in volumes):
        problems.append(f"WORKDIR {workdir[-1:]} must be on a VOLUME ({volumes}): runs go to the mounted volume")
    env = " ".join(a for w, a in ins if w == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    if not hf_home or hf_home.group(1) not in volumes:
        problems.append(f"HF_HOME must be a VOLUME ({volumes})")
    for offline in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        if offline not in env:
            problems.append(f"ENV {offline} missing: jobs read local files only")
    if "cuda" in args_before.get("BASE", ""):  # NCCL across nodes dlopens libibverbs; without it: TCP sockets only
        rdma = [run for run in runs if "libibverbs1" in run and "ibverbs-providers" in run and "librdmacm1" in run]
        if not rdma:
            problems.append("the CUDA image must install the RDMA userspace NCCL uses across nodes "
                            "(libibverbs1, ibverbs-providers, librdmacm1)")
    return problems


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_follow_the_rules(name):
    assert dockerfile_problems((REPO / "docker" / name).read_text()) == []


@pytest.mark.parametrize("old,new,message", [
    ("FROM ${BASE}", "FROM python:3.11", "the base must be the build ARG BASE"),
    ("USER fft", "USER root", "non-root"),
    ('ENTRYPOINT ["fft-dist"]', 'ENTRYPOINT ["python"]', "ENTRYPOINT"),
    ("pip install -q /tmp/fft-dist-src", "pip install -q -e /tmp/fft-dist-src", "editable"),
    ("torch==2.13.0", "torch", "pinned"),
    ("COPY conf ", "COPY README.md ", "conf/"),
    ("--no-build-isolation", "", "deepspeed"),
    ("WORKDIR /work", "WORKDIR /home/fft", "WORKDIR"),
    ("HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0", "HF_HUB_OFFLINE"),
    ("ibverbs-providers", "", "RDMA userspace"),
])
def test_the_dockerfile_parser_catches_each_rule(old, new, message):
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(message in p for p in problems), problems


