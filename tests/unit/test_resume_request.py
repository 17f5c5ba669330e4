"""`resume` is typed (issue 18): one parse (:class:`fft_dist.config.ResumeRequest`), one restart rule
(:func:`fft_dist.checkpoint.resume.after_restart`), and no code that compares the bare string."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import REPO
from fft_dist.checkpoint.resume import after_restart
from fft_dist.config import FFTConfig, ResumeKind, ResumeRequest


@pytest.mark.parametrize("value, kind, path", [
    ("none", ResumeKind.none, None), ("", ResumeKind.none, None), (None, ResumeKind.none, None),
    ("auto", ResumeKind.auto, None), ("runs/a/checkpoints/latest", ResumeKind.path, Path("runs/a/checkpoints/latest")),
    ("autox", ResumeKind.path, Path("autox")),
])
def test_parse(value, kind, path):
    request = ResumeRequest.parse(value)
    assert (request.kind, request.path) == (kind, path)
    assert request.fresh == (kind is ResumeKind.none)


def test_the_config_exposes_the_typed_request():
    cfg = FFTConfig()
    assert cfg.resume_request.fresh
    cfg.resume = "auto"
    assert cfg.resume_request.kind is ResumeKind.auto


def test_the_restart_rule_continues_the_run_and_keeps_a_named_checkpoint():
    assert after_restart("none") == "auto"
    assert after_restart("auto") == "auto"
    assert after_restart("/ck/step-0000004") == "/ck/step-0000004"


def test_no_module_compares_the_resume_string():
    pattern = re.compile(r"""resume\s*(==|!=|not in|in)\s*[("']""")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
            for p in sorted((REPO / "fft_dist").rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, "use cfg.resume_request / ResumeRequest.parse:\n" + "\n".join(hits)
