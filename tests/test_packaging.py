"""Packaging: a normal (non-editable) install works (the wheel carries the configs and assets, and
its `fft-dist` console script trains from an empty directory, importing the installed package),
and the declared version floors agree with .ci/run and with the environment the tests ran in."""
from __future__ import annotations

import importlib.metadata
import re
import shutil
import site
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from helpers import REPO, TINY_JOB, child_env, train_losses

# Build outputs and local state that must not leak into the copy the wheel is built from
# (a stale build/lib would put files that git no longer has into the wheel).
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                      ".pytest_cache", "runs", "outputs")


def _clean_env() -> dict[str, str]:
    env = child_env()
    for key in ("PYTHONPATH", "FFT_DIST_CONF_DIR"):  # a test run may point these at the repo
        env.pop(key, None)
    return env


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_NOT_SOURCES)
    out = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)],
                   env=_clean_env(), check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("fft_dist-*.whl")
    return wheel


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh venv that sees this interpreter's site-packages as a plain path (so torch is not
    reinstalled, and .pth files there, such as an editable install's finder, are not run)."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Install before adding the outer path: there pip would find the editable fft-dist and skip.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)],
                   env=_clean_env(), check=True, capture_output=True, text=True, timeout=300)
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    return env_dir


def test_wheel_installs_and_trains_from_empty_dir(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("fft_dist/conf/config.yaml", "fft_dist/conf/model/tiny_llama.yaml",
                   "fft_dist/assets/stdlib_docstrings.jsonl", "fft_dist/assets/tokenizer/tokenizer.json"):
        assert needed in names, f"{needed} missing from {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "tools/", "conf/"))], names

    env_dir = _venv_with_wheel(tmp_path, wheel)
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env()

    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import fft_dist; print(fft_dist.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(env_dir.resolve()), f"imported {where}, not the installed wheel"

    proc = subprocess.run([str(env_dir / "bin" / "fft-dist"), "train", "run.dir=run", "parallelism=fsdp",
                           "launcher.nproc_per_node=2", *TINY_JOB, "train.max_steps=3"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    losses = train_losses(work / "run")
    assert len(losses) == 3 and all(l > 0 for l in losses), losses
    # The default data set is an ${asset:} path: it must resolve inside the installed package.
    resolved = (work / "run" / "config.yaml").read_text()
    assert f"path: {env_dir.resolve()}/" in resolved, resolved
    assert str(REPO) not in resolved, "the run used the repo's files, not the installed package's"


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
