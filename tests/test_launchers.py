"""`fft-dist launch`: what every launcher would run (dry runs, checked by bash and shlex), options a
launcher does not use refused, and real runs under torchrun and the deepspeed launcher, including a
torchrun group restart after `kill -9` of a rank that resumes to bit-identical weights."""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import child_env, children, fft_dist, REPO, step_records, TINY_JOB
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointReader
from fft_dist.preemption import STOP_SIGNALS

ODD = "/tmp/fft dist's $HOME run"  # a space, a quote and a $: must reach the ranks unchanged


def dry(*overrides: str) -> subprocess.CompletedProcess:
    """`fft-dist launch ... launcher.dry_run=true` in this process (a dry run starts nothing; seconds saved)."""
    from fft_dist.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["launch", *overrides, "launcher.dry_run=true"])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for sig, handler in handlers.items():  # the launcher's stop-signal forwarding is not pytest's
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["fft-dist", "launch", *overrides], code, out.getvalue(), err.getvalue())


def dry_ok(*overrides: str) -> str:
    proc = dry(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def bash_syntax_ok(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, f"bash -n: {proc.stderr}\n{text}"


def last_line_words(text: str) -> list[str]:
    line = [ln for ln in text.splitlines() if ln and not ln.startswith("#")][-1]
    bash_syntax_ok(line)
    return shlex.split(line)


def flag(words: list[str], name: str) -> str:
    """The value of option `name`, given in the attached form `--name=value` (never as a separate word)."""
    assert name not in words, f"{name} followed by a separate value word: {words}"
    return next(w.split("=", 1)[1] for w in words if w.startswith(name + "="))


def test_local_and_torchrun_dry_runs_show_the_torchrun_command_and_run_nothing(tmp_path):
    run = tmp_path / "r"
    words = last_line_words(dry_ok(f"run.dir={run}", "launcher.nproc_per_node=3", "train.global_batch_size=12",
                                   "train.micro_batch_size=4"))
    assert words[0] == f"FFT_DIST_CONFIG={run}/config.yaml" and "--standalone" in words
    assert flag(words, "--nproc_per_node") == "3" and flag(words, "--max_restarts") == "0"
    assert not run.exists(), "a dry run must not create the run directory"
    nodes = ["launcher=torchrun", "launcher.nnodes=2", "launcher.rdzv_endpoint=10.77.0.1:29400",
             "launcher.rdzv_id=job7", "launcher.max_restarts=3", f'run.dir="{ODD}"', "+launcher.env.ODD='a \"b\" $c'"]
    for rank in (0, 1):
        words = last_line_words(dry_ok(*nodes, f"launcher.node_rank={rank}", f"launcher.local_addr=10.77.0.{rank + 1}"))
        assert words[:2] == [f"FFT_DIST_CONFIG={ODD}/config.yaml", 'ODD=a "b" $c'], words[:2]
        assert (flag(words, "--nnodes"), flag(words, "--node_rank"), flag(words, "--rdzv_backend")) == ("2", str(rank), "c10d")
        assert (flag(words, "--rdzv_endpoint"), flag(words, "--rdzv_id")) == ("10.77.0.1:29400", "job7")
        assert flag(words, "--local_addr") == f"10.77.0.{rank + 1}" and flag(words, "--max_restarts") == "3"
        assert flag(words, "--rdzv_conf") == f"is_host={'true' if rank == 0 else 'false'}"
    # the whole job's world size (2 nodes x 2 ranks) is what the batch must divide by
    proc = dry("launcher=torchrun", "launcher.nnodes=2", "launcher.rdzv_endpoint=h:1", "train.global_batch_size=4",
               "train.micro_batch_size=2")
    assert proc.returncode == 2 and "world size (4)" in proc.stderr, proc.stderr


@pytest.mark.parametrize("parallelism", ["zero2", "zero3"])
def test_deepspeed_dry_runs_local_and_hostfile(tmp_path, parallelism):
    words = last_line_words(dry_ok("launcher=deepspeed", f"parallelism={parallelism}", f"run.dir={tmp_path}/r"))
    assert words[0] == f"FFT_DIST_CONFIG={tmp_path}/r/config.yaml"
    assert words[2:4] == ["-m", "deepspeed.launcher.runner"] and flag(words, "--num_gpus") == "2"
    assert words[-2:] == ["--module", "fft_dist.train"]
    out = dry_ok("launcher=deepspeed", f"parallelism={parallelism}", f"run.dir={tmp_path}/r", "launcher.hosts=[n1,n2]",
                 "launcher.nproc_per_node=4", "train.global_batch_size=32", "launcher.include='n1:0,1@n2'",
                 "launcher.exclude=n2:3", "+launcher.env.NCCL_SOCKET_IFNAME=eth0")
    assert f"# {tmp_path}/r/hostfile: n1 slots=4" in out and f"# {tmp_path}/r/hostfile: n2 slots=4" in out
    assert "NCCL_SOCKET_IFNAME=eth0" in out and f"FFT_DIST_CONFIG={tmp_path}/r/config.yaml" in out
    words = last_line_words(out)
    assert words[0] == f"DS_ENV_FILE={tmp_path}/r/deepspeed_env" and "--num_gpus" not in words
    assert (flag(words, "--hostfile"), flag(words, "--include"), flag(words, "--exclude")) == (
        f"{tmp_path}/r/hostfile", "n1:0,1@n2", "n2:3")


def slurm_script(*overrides: str) -> str:
    text = dry_ok("launcher=slurm", *overrides)
    assert text.startswith("#!/bin/bash\n")
    bash_syntax_ok(text)
    return text


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


def test_container_dry_run(tmp_path):
    words = last_line_words(dry_ok("launcher=container", "launcher.image=localhost/fft-dist:cpu", "launcher.engine=podman",
                                   "launcher.mounts=[/data:/data:ro]", "launcher.gpus=all", f'run.dir="{ODD}"',
                                   "+launcher.env.HF_HOME=/data/hf"))
    assert words[:3] == ["podman", "run", "--rm"] and f"--volume={ODD}:{ODD}" in words
    assert "--volume=/data:/data:ro" in words and "--env=HF_HOME=/data/hf" in words
    assert flag(words, "--gpus") == "all" and flag(words, "--ipc") == "host"
    assert f"--env=FFT_DIST_CONFIG={ODD}/config.yaml" in words
    image = words.index("localhost/fft-dist:cpu")
    assert words[image + 1] == "node" and flag(words, "--nproc_per_node") == "2"
    words = last_line_words(dry_ok("launcher=container", "launcher.image=i", "launcher.ipc_host=false",
                                   "launcher.shm_size=8g", f"run.dir={tmp_path}/r"))
    assert flag(words, "--shm-size") == "8g" and not [w for w in words if w.startswith("--ipc")]


@pytest.mark.parametrize("overrides,message", [
    (["launcher=local", "launcher.max_restarts=1"], "launcher.max_restarts=1"),
    (["launcher=torchrun", "launcher.image=x"], "launcher.image is not an option of launcher=torchrun"),
    (["launcher=deepspeed", "parallelism=zero2", "launcher.nodes=2"], "launcher.nodes=2"),
    (["launcher=slurm", "launcher.rdzv_endpoint=a:1"], "launcher.rdzv_endpoint is not an option of launcher=slurm"),
    (["launcher=container", "launcher.image=i", "launcher.shm_size=8g"], "launcher.shm_size"),
    (["launcher=container"], "launcher.image"),
    (["launcher=torchrun", "launcher.nnodes=2"], "launcher.rdzv_endpoint"),
    (["launcher=torchrun", "launcher.nnodes=2", "launcher.node_rank=1", "launcher.rdzv_endpoint=a:1"], "run.dir"),
])
def test_options_the_launcher_does_not_use_are_refused(overrides, message):
    proc = dry(*overrides)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_train_is_launcher_local_only(tmp_path):
    proc = fft_dist("train", "launcher=torchrun", f"run.dir={tmp_path}/r", timeout=120)
    assert proc.returncode == 2 and "fft-dist launch" in proc.stderr, proc.stderr


def test_shipped_launch_scripts_parse():
    for path in sorted((REPO / "scripts").glob("*.s*")):
        bash_syntax_ok(path.read_text())


def launch(run: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = fft_dist("launch", f"run.dir={run}", *TINY_JOB, *overrides, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_ranks_finish_under_the_real_launcher(tmp_path, launcher):
    extra = ["parallelism=zero2"] if launcher == "deepspeed" else []
    launch(tmp_path / "r", f"launcher={launcher}", *extra, "train.max_steps=4")
    steps = step_records(tmp_path / "r")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in steps)  # finite numbers, logged by the ranks


def kill_job(proc: subprocess.Popen) -> None:
    """Never leave a job behind when a test fails: its ranks first, then the launcher."""
    if proc.poll() is None:
        for pid in children(proc.pid):
            os.kill(pid, 9)
        proc.kill()
        proc.communicate()


def start_launch(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "launch", f"run.dir={run}", *overrides], cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def assert_same_weights(a: Path, b: Path) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            x, y = ra.read_full(name, kind), rb.read_full(name, kind)
            assert torch.equal(x, y), f"{name} ({kind}): max diff {(x - y).abs().max()}"


@pytest.mark.slow
def test_torchrun_restart_after_kill_9_resumes_to_identical_weights(tmp_path):
    job = [*TINY_JOB, "launcher=torchrun", "train.max_steps=12", "checkpoint.every_steps=3",
           "checkpoint.save_final=true", "checkpoint.keep_last=10"]
    launch(tmp_path / "full", *job)
    run = tmp_path / "restarted"
    proc = start_launch(run, *job, "launcher.max_restarts=1")
    try:
        deadline = time.time() + 240
        while ckpt.find_resume("auto", run / "checkpoints") is None:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], 9)
        out, err = proc.communicate(timeout=300)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"
    assert "resumed from" in out + err, "the restarted ranks must resume from the checkpoint"
    assert not [p for p in ranks if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]
    final = "step-0000012"
    assert ckpt.verify_checkpoint(run / "checkpoints" / final) == []
    assert_same_weights(run / "checkpoints" / final, tmp_path / "full" / "checkpoints" / final)


@pytest.mark.slow
def test_a_stop_signal_is_not_undone_by_a_torchrun_restart(tmp_path):
    """SIGTERM to the launcher: ranks checkpoint and exit 75; torchrun restarts them, and they stop at once."""
    run = tmp_path / "r"
    proc = start_launch(run, *TINY_JOB, "launcher=torchrun", "launcher.max_restarts=2", "train.max_steps=400")
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        kill_job(proc)
    assert proc.returncode == 75, f"{out[-3000:]}\n{err[-5000:]}"
    assert "not restarting: the job was stopped by SIGTERM" in out, out[-3000:]
    found = ckpt.find_resume("auto", run / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
    assert max(r["step"] for r in step_records(run)) < 400


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_checkpoints_and_exits_75(tmp_path):
    """SIGINT to the terminal's process group: DeepSpeed's runner (own session, deaf to it) does not
    kill the ranks; fft-dist forwards the stop to the ranks, which checkpoint and exit 75."""
    run = tmp_path / "r"
    proc = start_launch(run, *TINY_JOB, "launcher=deepspeed", "parallelism=zero2", "train.max_steps=400")
    runner = None
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        runner = children(proc.pid)[0]
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if runner is not None and proc.poll() is None:
            os.killpg(runner, 9)
        kill_job(proc)
    assert proc.returncode == 75, f"{out[-3000:]}\n{err[-5000:]}"
    found = ckpt.find_resume("auto", run / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
    last = max(r["step"] for r in step_records(run))
    assert last < 400 and found.name == f"step-{last:07d}"


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2): two "nodes" on one box."""
    tag = f"{os.getpid() % 100000}"
    ns, veth = [f"fft{tag}n{i}" for i in (0, 1)], [f"fft{tag}v{i}" for i in (0, 1)]
    steps = [["ip", "netns", "add", ns[0]], ["ip", "netns", "add", ns[1]],
             ["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]]]
    for i in (0, 1):
        steps += [["ip", "link", "set", veth[i], "netns", ns[i]],
                  ["ip", "-n", ns[i], "addr", "add", f"10.77.0.{i + 1}/24", "dev", veth[i]],
                  ["ip", "-n", ns[i], "link", "set", veth[i], "up"], ["ip", "-n", ns[i], "link", "set", "lo", "up"]]
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode:
                print(f"SKIP reason: {' '.join(step)} failed: {proc.stderr.strip()}")
                pytest.skip(f"cannot make network namespaces here: {' '.join(step)}: {proc.stderr.strip()}")
        yield ns, veth
    finally:
        for name in ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_match_a_single_node_run(tmp_path, two_namespaces):
    ns, veth = two_namespaces
    job = [*TINY_JOB, "train.max_steps=4"]
    launch(tmp_path / "single", *job, "launcher=torchrun")
    run = tmp_path / "two-nodes"
    procs = []
    try:
        for rank in (0, 1):
            cmd = ["ip", "netns", "exec", ns[rank], "env", f"GLOO_SOCKET_IFNAME={veth[rank]}", sys.executable, "-m",
                   "fft_dist.cli", "launch", f"run.dir={run}", *job, "launcher=torchrun", "launcher.nnodes=2",
                   f"launcher.node_rank={rank}", "launcher.nproc_per_node=1", "launcher.rdzv_endpoint=10.77.0.1:29400",
                   f"launcher.local_addr=10.77.0.{rank + 1}", f"launcher.rdzv_id=t{os.getpid()}"]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            kill_job(p)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"
    assert "(node 1 of 2)" in outs[1][0]
    single, two = [r["loss"] for r in step_records(tmp_path / "single")], [r["loss"] for r in step_records(run)]
    assert len(two) == 4 and two == single, (two, single)


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
