"""SLURM. The dry run is a whole sbatch script (bash -n, the srun line per backend, a hostfile and one
runner per node with the deepspeed launcher, requeue and signal lines that can be turned off, unsafe
#SBATCH values refused), and scripts/slurm.sbatch matches the generator.

A real SLURM (Debian's slurm-wlm + munge, one node on 127.0.0.1): `fft-dist launch launcher=slurm`
submits a 2-rank CPU job that finishes; `scancel --signal=USR1` makes it checkpoint (exit 75) and
requeue itself, and the requeued job resumes and ends with the uninterrupted job's exact losses.
The fixture installs the packages when they are missing (root + apt-get), starts munged,
slurmctld and slurmd with a private slurm.conf, and stops them afterwards. Where that is not
possible the tests are skipped with the reason printed.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
import shutil
import socket

import pytest

from helpers import child_env, fft_dist, REPO, step_records, TINY_JOB
from fft_dist import checkpoint as ckpt
from launch_checks import ODD, bash_syntax_ok, dry, dry_ok, slurm_script


@pytest.mark.parametrize("parallelism", ["fsdp", "zero2", "zero3"])
def test_slurm_dry_run_is_a_whole_sbatch_script(tmp_path, parallelism):
    text = slurm_script("launcher.nodes=4", "launcher.gpus_per_node=8", "train.global_batch_size=128",
                        f"parallelism={parallelism}", f"run.dir={tmp_path}/r", "launcher.partition=gpu",
                        "launcher.account=proj1", "launcher.qos=high", "launcher.time=04:00:00",
                        "launcher.cpus_per_task=32", "launcher.signal_lead_s=300",
                        "launcher.sbatch_lines=['#SBATCH --exclusive']", "launcher.setup=['module load cuda/12']",
                        "+launcher.env.ODD='a \"b\" $c'")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                 "#SBATCH --qos=high", "#SBATCH --time=04:00:00", "#SBATCH --signal=USR1@300", "#SBATCH --requeue",
                 "#SBATCH --exclusive", "module load cuda/12", 'scontrol requeue "$SLURM_JOB_ID"',
                 'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")'):
        assert line + "\n" in text, f"missing {line!r}:\n{text}"
    srun = text[text.index("srun "):text.index("code=$?")]
    assert "--nproc_per_node=8 --nnodes=4 --rdzv_backend=c10d" in srun and '--rdzv_endpoint="$head:29500"' in srun
    # the exports reach the ranks unchanged: run them through bash
    exports = "".join(ln + "\n" for ln in text.splitlines() if ln.startswith("export "))
    got = subprocess.run(["bash", "-c", exports + 'printf "%s|%s" "$ODD" "$FFT_DIST_CONFIG"'], capture_output=True,
                         text=True).stdout
    assert got == f'a "b" $c|{tmp_path}/r/config.yaml'


def test_slurm_with_the_deepspeed_launcher_writes_a_hostfile_and_runs_one_runner_per_node(tmp_path):
    text = slurm_script("launcher.nodes=2", "launcher.gpus_per_node=4", "train.global_batch_size=32",
                        "parallelism=zero3", "launcher.use_deepspeed_launcher=true", f"run.dir={tmp_path}/r")
    assert "printf '%s slots=4\\n' \"${nodes[@]}\" > \"$log_dir/hostfile\"" in text, text
    srun = text[text.index("srun "):text.index("code=$?")]
    # each task expands its own SLURM_NODEID (escaped from the batch shell); no ssh, rendezvous on the first node
    for part in ("node --deepspeed --hostfile=$log_dir/hostfile --no_ssh", r"--node_rank=\$SLURM_NODEID",
                 "--master_addr=$head --master_port=29500", "--module fft_dist.train"):
        assert part in srun, f"missing {part!r}:\n{srun}"
    assert "torch.distributed.run" not in srun and "--rdzv" not in srun
    assert "#SBATCH --signal=USR1@120" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    refused = dry("launcher=slurm", "launcher.use_deepspeed_launcher=true", "parallelism=fsdp")
    assert refused.returncode == 2 and "for the ZeRO backends" in refused.stderr, refused.stderr


def test_slurm_requeue_and_signal_can_be_turned_off_and_unsafe_sbatch_values_are_refused(tmp_path):
    text = slurm_script("launcher.gpus_per_node=0", "launcher.nproc_per_node=2", f"run.dir={tmp_path}/r",
                        "launcher.requeue=false", "launcher.signal_lead_s=0")
    assert "#SBATCH --no-requeue\n" in text and "scontrol requeue" not in text and "--signal=" not in text
    assert "#SBATCH --gpus-per-node" not in text and "--standalone" in text
    proc = dry("launcher=slurm", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2", f'run.dir="{ODD}"')
    assert proc.returncode == 2 and "#SBATCH" in proc.stderr, proc.stderr


def test_the_slurm_template_matches_the_generator():
    """scripts/slurm.sbatch is the generator's output for the overrides in its header, plus comments."""
    template = (REPO / "scripts" / "slurm.sbatch").read_text()
    header = next(ln for ln in template.splitlines() if ln.startswith("# Generated by: "))
    overrides = shlex.split(header[len("# Generated by: fft-dist launch "):])
    generated = dry_ok(*overrides).replace(sys.executable, "/shared/venv/bin/python")

    def code(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln and (not ln.startswith("#") or ln.startswith(("#SBATCH", "#!")))]

    assert code(template) == code(generated)
    bash_syntax_ok(template)


pytestmark = pytest.mark.slow


DAEMONS = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol", "scancel", "sinfo")


def skip(reason: str):
    print(f"SKIP reason: {reason}", flush=True)
    pytest.skip(reason)


def sh(*cmd: str, env: dict | None = None, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def install_if_missing() -> None:
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        skip("slurm-wlm and munge are not installed, and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode:
            skip(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def start_munge() -> int | None:
    """Start munged unless one answers already; return the pid we started."""
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    for d in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    sh("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    for _ in range(50):
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return int(Path("/run/munge/munged.pid").read_text())
        time.sleep(0.1)
    skip("munged did not answer (munge -n | unmunge)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster; everything stopped afterwards."""
    if os.geteuid() != 0:
        skip("a private slurmctld/slurmd with SlurmUser=root needs root")
    install_if_missing()
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=fftdist", f"SlurmctldHost={host}(127.0.0.1)", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SlurmUser=root", "SlurmdUser=root", "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none", "ReturnToService=2",
        # A requeued job may start only once the killed attempt's credential has expired (slurmd
        # refuses it as "revoked" before that); 10 s instead of the default 120 keeps the test short.
        "AuthInfo=cred_expire=10", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid", f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd.log", f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    (d / "state").mkdir()
    (d / "spool").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munged = start_munge()
    started: list[Path] = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            proc = sh(f"/usr/sbin/{daemon}", "-f", str(conf), env=env, check=False)
            if proc.returncode:
                skip(f"{daemon} did not start: {proc.stderr.strip()}")
            started.append(d / f"{daemon}.pid")
        deadline = time.time() + 60
        while "idle" not in sh("sinfo", "-h", "-o", "%T", env=env, check=False).stdout:
            if time.time() > deadline:
                logs = "".join((d / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (d / f).exists())
                skip(f"the node never became idle in sinfo:\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in reversed(started):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        if munged:
            os.kill(munged, signal.SIGTERM)
        time.sleep(1)


def job_state(job: str, env: dict) -> dict[str, str]:
    out = sh("scontrol", "show", "job", "-o", job, env=env, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def submit(run: Path, env: dict, *overrides: str) -> str:
    proc = fft_dist("launch", "launcher=slurm", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2",
                    "launcher.cpus_per_task=2", f"run.dir={run}", *TINY_JOB, *overrides, env=child_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = proc.stdout.split("submitted SLURM job ")[1].split()[0]
    assert f"{run}/slurm/{job}.out" in proc.stdout
    return job


def wait_done(job: str, env: dict, run: Path, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job, env)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    sh("scancel", job, env=env, check=False)
    raise AssertionError(f"job {job} did not finish: {job_state(job, env)}\n{logs(run)}")


def logs(run: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((run / "slurm").rglob("*.*")) if p.is_file())


JOB = ["train.max_steps=60", "checkpoint.save_final=true", "checkpoint.every_steps=0"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("slurm-full") / "run"
    job = submit(run, slurm, *JOB)
    state = wait_done(job, slurm, run)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{logs(run)}"
    return run


def test_slurm_job_runs_two_ranks_and_checkpoints(uninterrupted):
    steps = [r["step"] for r in step_records(uninterrupted)]
    assert steps == list(range(1, 61)), steps
    found = ckpt.find_resume("auto", uninterrupted / "checkpoints")
    assert found is not None and found.name == "step-0000060" and ckpt.verify_checkpoint(found) == []
    assert list((uninterrupted / "slurm").glob("*/attempt-0-node-0.log"))


def usr1_after_three_steps_then_finish(job: str, run: Path, env: dict) -> list[dict]:
    """scancel --signal=USR1 once the job has logged 3 steps; wait for the requeued job to finish."""
    deadline = time.time() + 240
    while len(step_records(run) if (run / "metrics.jsonl").exists() else []) < 3:
        assert time.time() < deadline and job_state(job, env).get("JobState") in ("PENDING", "RUNNING"), logs(run)
        time.sleep(0.2)
    sh("scancel", "--signal=USR1", job, env=env)
    deadline = time.time() + 240
    while True:  # the script requeues itself after exit 75; the job starts again once its old credential expired
        state = job_state(job, env)
        if int(state.get("Restarts", "0")) >= 1 and state.get("JobState") in ("PENDING", "RUNNING"):
            break
        assert time.time() < deadline and state.get("JobState") != "COMPLETED", f"{state}\n{logs(run)}"
        time.sleep(0.5)
    state = wait_done(job, env, run)
    assert state["JobState"] == "COMPLETED", f"{state}\n{logs(run)}"
    text = logs(run)
    assert "job step exited with 75" in text and "requeueing job" in text, text
    assert "resumed from" in text, text
    records = step_records(run)
    steps = [r["step"] for r in records]
    assert max(steps) == 60 and len(set(steps)) == 60
    return records


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(slurm, uninterrupted, tmp_path):
    run = tmp_path / "run"
    records = usr1_after_three_steps_then_finish(submit(run, slurm, *JOB), run, slurm)
    by_step = {r["step"]: r["loss"] for r in records}
    reference = {r["step"]: r["loss"] for r in step_records(uninterrupted)}
    assert by_step == reference


def test_the_deepspeed_launcher_under_slurm_checkpoints_requeues_and_resumes(slurm, uninterrupted, tmp_path):
    """launcher.use_deepspeed_launcher=true: one DeepSpeed runner per node (hostfile from the allocation);
    USR1 reaches the ranks, not the runner. ZeRO-2 is not bit-identical to the FSDP reference, only close."""
    run = tmp_path / "run"
    job = submit(run, slurm, *JOB, "parallelism=zero2", "launcher.use_deepspeed_launcher=true")
    records = usr1_after_three_steps_then_finish(job, run, slurm)
    assert "slots=2" in next((run / "slurm").glob("*/hostfile")).read_text()
    reference = {r["step"]: r["loss"] for r in step_records(uninterrupted)}
    worst = max(abs(r["loss"] - reference[r["step"]]) for r in records)
    assert worst < 1e-3, worst
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-0000060") == []
