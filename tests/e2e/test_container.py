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
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from doc_pages import all_text, block_after
from helpers import REPO, assert_close_rel, child_env, fft_dist, step_records, train_losses


TIMINGS: dict[str, float] = {}
BASE_IMAGE = "localhost/debian-py:bookworm"


DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, which the cp311 torch wheels fit


IMAGE_UID = "1000"  # docker/Dockerfile.cpu's FFT_UID default


# The default job, shortened from 120 to 30 steps to keep CI time down (eval at the end only).
SHORT = ["train.max_steps=30", "eval.every_steps=0"]


# crun refuses this machine's hybrid cgroups and its setrlimit is refused: see shared CPU-FACTS.
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'


LOSSES: dict[str, list[float]] = {}  # the default job's losses, per way of running it


def readme_block_after(marker: str) -> str:
    """The shell lines (continuations joined) of the code block that follows `marker` (README.md, docs/*.md)."""
    return block_after(marker).replace("\\\n", " ")


def test_readme_kubernetes_env_only_torchrun_dry_run(tmp_path):
    block = readme_block_after("Kubernetes-style")
    env = child_env(MASTER_ADDR="10.9.0.4", MASTER_PORT="29400", NNODES="2", NODE_RANK="1", GPUS_PER_NODE="2",
                    JOB_ID="ft-42", SHARED=str(tmp_path))
    # the README's lines as they are, plus a dry run; `fft-dist` is this checkout's entry point
    script = (f"fft-dist() {{ {shlex.quote(sys.executable)} -m fft_dist.cli \"$@\"; }}\n"
              + "\n".join(line + " launcher.dry_run=true" if line.startswith("fft-dist ") else line
                          for line in block.splitlines()))
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    pairs = dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)  # options take attached values
    assert pairs["--nnodes"] == "2" and pairs["--node_rank"] == "1" and pairs["--nproc_per_node"] == "2"
    assert pairs["--rdzv_backend"] == "c10d" and pairs["--rdzv_endpoint"] == "10.9.0.4:29400"
    assert pairs["--rdzv_id"] == "ft-42" and pairs["--rdzv_conf"] == "is_host=false"
    assert f"FFT_DIST_CONFIG={tmp_path}/runs/ft-42/config.yaml" in words


def skip(reason: str):
    print(f"SKIP reason: {reason}", flush=True)
    pytest.skip(reason)


def sh(*cmd: str, env: dict | None = None, timeout: int = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def timed(name: str, started: float) -> None:
    TIMINGS[name] = time.monotonic() - started
    print(f"container test timing: {name} {TIMINGS[name]:.0f} s", flush=True)


@pytest.fixture(scope="module", autouse=True)
def report_timings(request):
    """Each step's wall time, also in CI's output (where prints are captured)."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if TIMINGS and reporter and capture:
        lines = [f"  {name}: {seconds:.0f} s" for name, seconds in TIMINGS.items()]
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("\ncontainer test wall times:\n" + "\n".join(lines))


def install_if_missing() -> None:
    if all(shutil.which(tool) for tool in ("podman", "runc", "debootstrap")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        skip("podman, runc and debootstrap are not installed, and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "podman", "runc", "debootstrap"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode:
            skip(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def debian_mirror() -> str:
    """The Debian archive apt uses here (debootstrap fetches from it), else the public one."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for uri in re.findall(r"^(?:URIs:|deb)\s+(\S+)", text, flags=re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def make_base_image(env: dict, tmp: Path) -> None:
    """debootstrap a minimal Debian with python3 + venv + pip and import it (skipped if cached)."""
    if sh("podman", "image", "exists", BASE_IMAGE, env=env).returncode == 0:
        print(f"container test: reusing {BASE_IMAGE}", flush=True)
        return
    rootfs = tmp / "rootfs"
    started = time.monotonic()
    try:
        proc = sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip", DEBIAN_SUITE,
                  str(rootfs), debian_mirror(), env=env, timeout=1200)
        if proc.returncode:
            skip(f"debootstrap failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env,
                                  capture_output=True, text=True, timeout=600)
        tar.wait()
        assert imported.returncode == 0, imported.stderr[-2000:]
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    timed("debootstrap + import of the base image", started)


def pip_build_flags(tmp: Path) -> list[str]:
    """`podman build` flags that let pip inside the build install exactly as on this machine.

    The effective pip settings here (config files and PIP_* variables) become one /etc/pip.conf
    in the build, and the local folders and files they name are mounted read-only. Where those
    folders hold torch's CPU wheel (no download.pytorch.org here), the build takes torch from
    PyPI's index plus that wheel, which wins over PyPI's CUDA build as the later version
    (2.13.0+cpu); elsewhere the Dockerfile's default index is used.
    """
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {m[1]: m[2] for m in re.finditer(r"^[\w.-]+?\.([\w-]+)='(.*)'$", listed, flags=re.M)}
    for key in ("find-links", "extra-index-url", "index-url", "constraint", "cert", "trusted-host"):
        from_env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if from_env:
            settings[key] = from_env
    wanted = {k: v for k, v in settings.items()
              if k in ("find-links", "extra-index-url", "index-url", "constraint", "cert", "trusted-host")}
    conf = tmp / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in wanted.items()))
    mounts = {"/etc/ssl/certs"}
    for value in wanted.values():
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                # a file, a find-links folder, or an index whose files sit beside its simple/
                mounts.add(str(path.parent if path.is_file() or path.name == "simple" else path))
    flags = ["--network", "host", "-v", f"{conf}:/etc/pip.conf:ro"]
    for m in sorted(mounts):
        flags += ["-v", f"{m}:{m}:ro"]
    links = [Path(p.removeprefix("file://")) for p in wanted.get("find-links", "").split()]
    if any(d.is_dir() and any(d.glob("torch-2.13.0+cpu-*.whl")) for d in links):
        flags += ["--build-arg", "TORCH_INDEX=https://pypi.org/simple"]
    return flags


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """Environment for podman calls (private containers.conf), with the base image in place."""
    if os.geteuid() != 0:
        skip("podman with runc and a debootstrapped base needs root here (rootless podman is not set up)")
    install_if_missing()
    tmp = tmp_path_factory.mktemp("podman")
    conf = tmp / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    proc = sh("podman", "info", env=env)
    if proc.returncode:
        skip(f"podman info failed: {proc.stderr.strip()[-800:]}")
    make_base_image(env, tmp)
    return env


def readme_commands(prefix: str) -> list[str]:
    """The shell lines of README.md and docs/*.md (continuations joined) that start with `prefix`."""
    text = all_text().replace("\\\n", " ")
    return [re.sub(r"\s+", " ", line.strip()) for line in text.splitlines() if line.strip().startswith(prefix)]


def docker_as_podman(build_flags: list[str], image: str) -> str:
    """A bash `docker` function: podman with this machine's build flags, and the README's fft-dist:cpu
    tag swapped for the test's own (so a user's fft-dist:cpu image is never replaced)."""
    flags = " ".join(shlex.quote(f) for f in build_flags)
    return (f'docker() {{ local sub=$1; shift; local args=("${{@//fft-dist:cpu/{image}}}")\n'
            f'  if [ "$sub" = build ]; then podman build {flags} "${{args[@]}}"; '
            f'else podman "$sub" "${{args[@]}}"; fi; }}\n')


@pytest.fixture(scope="module")
def image(podman, tmp_path_factory):
    """docker/Dockerfile.cpu built by the README's `docker build` line; removed afterwards."""
    tmp = tmp_path_factory.mktemp("build")
    tag = f"localhost/fft-dist-test:cpu-{os.getpid()}"
    (build,) = [c for c in readme_commands("docker build") if "Dockerfile.cpu" in c]
    flags = ["--layers=false", "--build-arg", f"BASE={BASE_IMAGE}", *pip_build_flags(tmp)]
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", docker_as_podman(flags, tag) + build], cwd=REPO, env=podman,
                          capture_output=True, text=True, timeout=1800)
    timed("podman build of docker/Dockerfile.cpu", started)
    try:
        assert proc.returncode == 0, f"{build}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        yield tag
    finally:
        sh("podman", "rmi", "-f", tag, env=podman)


def host_dir(path: Path) -> Path:
    """A folder the image's non-root user may write to (as a user's own folder would be)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, int(IMAGE_UID), int(IMAGE_UID))
    return path


def check_run(run: Path) -> list[float]:
    """The job's metrics and checkpoint, read on the host; its losses."""
    steps = step_records(run)
    assert [r["step"] for r in steps] == list(range(1, 31)), steps[-3:]
    verify = fft_dist("ckpt", "verify", str(run / "checkpoints"))
    assert verify.returncode == 0, verify.stderr  # the container's checkpoint reads here: the format is portable
    return train_losses(run)


@pytest.mark.slow
def test_image_is_a_normal_non_root_install(podman, image):
    probe = ("import fft_dist, importlib.metadata as m, json, os; d = m.distribution('fft-dist'); "
             "print(json.dumps({'file': fft_dist.__file__, 'direct_url': json.loads(d.read_text('direct_url.json')), "
             "'uid': os.getuid(), 'cwd': os.getcwd(), 'sources_left': os.path.exists('/tmp/fft-dist-src'), "
             "'conf': os.path.exists(os.path.join(os.path.dirname(fft_dist.__file__), 'conf', 'config.yaml'))}))")
    proc = sh("podman", "run", "--rm", "--entrypoint", "python", image, "-c", probe, env=podman)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert "/site-packages/fft_dist/" in info["file"] and info["conf"], info
    assert not info["direct_url"].get("dir_info", {}).get("editable") and not info["sources_left"], info
    assert str(info["uid"]) == IMAGE_UID and info["cwd"] == "/work", info


@pytest.mark.slow
def test_readme_docker_run_trains_the_default_job_on_mounted_volumes(podman, image, tmp_path):
    (run_line,) = [c for c in readme_commands("docker run") if "fft-dist:cpu train" in c]
    home = tmp_path / "home"
    host_dir(home / ".cache" / "huggingface")
    host_dir(tmp_path / "work")
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", docker_as_podman([], image) + f"{run_line} {shlex.join(SHORT)}"],
                          cwd=tmp_path, env={**podman, "HOME": str(home)}, capture_output=True, text=True, timeout=900)
    timed("podman run of the default job (30 steps)", started)
    assert proc.returncode == 0, f"{run_line}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    (run,) = (tmp_path / "work" / "runs").iterdir()  # the default run.dir, on the mounted volume
    losses = check_run(run)
    assert losses[-1] < losses[0], losses
    LOSSES["docker run"] = losses  # compared with the launcher's run below


@pytest.mark.slow
def test_launch_launcher_container_runs_the_job_in_the_image(podman, image, tmp_path):
    run = host_dir(tmp_path / "run")
    started = time.monotonic()
    proc = fft_dist("launch", "launcher=container", "launcher.engine=podman", f"launcher.image={image}",
                    f"run.dir={run}", *SHORT, env=child_env(CONTAINERS_CONF=podman["CONTAINERS_CONF"]), timeout=900)
    timed("fft-dist launch launcher=container (30 steps)", started)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert f"podman run --rm --network=host --volume={run}:{run}" in proc.stdout
    losses = check_run(run)
    earlier = LOSSES.get("docker run")
    if earlier:  # the same job and image: the launcher runs exactly what `docker run` ran
        assert_close_rel(losses, earlier, 1e-6, "launcher=container vs docker run losses")
