"""Packaging: a normal (non-editable) install works (the wheel carries the configs and assets, and
its `fft-dist` console script trains from an empty directory, importing the installed package),
and the declared version floors agree with .ci/run and with the environment the tests ran in."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from packaging.requirements import Requirement

from helpers import REPO


def _requirements() -> dict[str, Requirement]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def test_version_floors_match_ci_and_the_tested_environment():
    reqs = _requirements()
    ci = (REPO / ".ci" / "run").read_text()
    # .ci/run installs torch and DeepSpeed by hand; it must ask for what pyproject declares.
    assert f"'{reqs['deepspeed']}'" in ci, f".ci/run must install '{reqs['deepspeed']}' (pyproject's extra)"
    torch_pin = re.search(r"pip install -q torch==(\S+)", ci).group(1)
    assert reqs["torch"].specifier.contains(torch_pin), f".ci/run pins torch=={torch_pin}, pyproject wants {reqs['torch']}"
    # The environment running the tests is the tested one: it must satisfy every floor.
    for name, req in reqs.items():
        have = importlib.metadata.version(name).split("+")[0]
        assert req.specifier.contains(have, prereleases=True), f"{name} {have} does not satisfy {req}"


def _pip_installs(line: str) -> list[list[str]]:
    """The `pip install` commands of a shell line, in order, as argument lists."""
    import shlex

    return [words[2:] for words in (shlex.split(part) for part in line.split("&&"))
            if words[:2] == ["pip", "install"]]


def test_readme_cuda_install_line_builds_deepspeed_against_your_torch():
    """README "Installing" (issue 17): on a CUDA box torch comes first (from a CUDA index), then fft-dist,
    then DeepSpeed with --no-build-isolation and pyproject's floor. `pip install -e '.[deepspeed]'`
    would build DeepSpeed in isolation, against a torch pip downloads for that build. (It cannot run
    here: no CUDA index; the CPU line is what .ci/run installs.)"""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Installing"):text.index("## Running")]
    bullet = section[section.index("- **CUDA box:**"):]
    bullet = bullet[:bullet.index("\n- **", 1)]
    line = next(ln.strip() for ln in bullet.splitlines() if ln.strip().startswith("pip install torch"))
    installs = _pip_installs(line)
    assert len(installs) == 3, line
    torch_args, ours, deepspeed = installs
    assert torch_args[0] == "torch" and "--index-url" in torch_args
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", torch_args[torch_args.index("--index-url") + 1])
    assert ours in (["-e", "."], ["."]), ours  # no [deepspeed] extra: that would build it in isolation
    assert "--no-build-isolation" in deepspeed
    assert str(_requirements()["deepspeed"]) in deepspeed, deepspeed
    assert "[deepspeed]" not in bullet
