"""Packaging: a normal (non-editable) install works (the wheel carries the configs and assets, and
its `fft-dist` console script trains from an empty directory, importing the installed package),
and the declared version floors agree with .ci/run and with the environment the tests ran in."""
from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

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
