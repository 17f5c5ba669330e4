"""The sbatch script for launcher=slurm (pure text, so dry runs and tests see all of it): one torchrun per node through srun, requeue after pre-emption.

SLURM's ``--signal=USR1@<lead>`` (and ``scancel --signal=USR1``) reaches the job step's tasks, the
per-node ``fft-dist node`` agents, which pass it to their ranks: they finish the step, checkpoint
and exit 75. The script then requeues the job; the requeued ranks see ``SLURM_RESTART_COUNT`` > 0
and resume from the newest complete checkpoint. ``scripts/slurm.sbatch`` is a commented copy.
"""
from __future__ import annotations

import re
import shlex
import sys

from fft_dist.config import ConfigError, LauncherConfig
from fft_dist.exit_codes import PREEMPTED
from fft_dist.launchers.agent import AGENT_FLAGS, RANK_MODULE, SLURM_PORT
from fft_dist.launchers.base import CONFIG_ENV
from fft_dist.launchers.shell import comment_words

SAFE = re.compile(r"[\w@%+=:,./-]+")


def q(value: str, what: str) -> str:
    """sbatch reads #SBATCH lines itself, not through a shell: only plain values can go there."""
    if not SAFE.fullmatch(value):
        raise ConfigError(f"{what}={value!r} goes into an #SBATCH line, which is not shell-quoted: use letters, "
                          "digits and @%+=:,./-_ only")
    return value


def sbatch_lines(launcher: LauncherConfig, *, log_dir: str) -> list[str]:
    lines = [f"#SBATCH --job-name={q(launcher.job_name, 'launcher.job_name')}", f"#SBATCH --nodes={launcher.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if launcher.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={launcher.gpus_per_node}")
    lines += cpu_request(launcher)[0]
    for key in ("partition", "account", "qos", "time"):
        if getattr(launcher, key):
            lines.append(f"#SBATCH --{key}={q(getattr(launcher, key), 'launcher.' + key)}")
    if launcher.signal_lead_s:
        lines.append(f"#SBATCH --signal=USR1@{launcher.signal_lead_s}")
    lines.append("#SBATCH --requeue" if launcher.requeue else "#SBATCH --no-requeue")
    lines += [f"#SBATCH --output={q(log_dir + '/%j.out', 'run.dir (the SLURM log folder)')}", "#SBATCH --open-mode=append"]
    return lines + list(launcher.sbatch_lines)


def cpu_request(launcher: LauncherConfig) -> tuple[list[str], str]:
    """(#SBATCH lines, srun option) asking for the CPUs of the one task per node, which runs all its ranks.

    Without a request, a cluster that shares GPU nodes gives the task one CPU, and 8 ranks share it.
    srun of SLURM 22.05 (and later, unless SRUN_CPUS_PER_TASK is set) does not inherit --cpus-per-task
    from sbatch, so srun repeats it. auto: with GPUs, whole nodes (--exclusive: every CPU, whatever the
    node's CPUs per GPU; full-parameter training also wants the node's memory bandwidth and host RAM),
    and srun takes all of the node's CPUs; without GPUs, one CPU per rank. 0: no request.
    """
    value = launcher.cpus_per_task
    if value == "auto":
        if launcher.gpus_per_node:
            return ["#SBATCH --exclusive"], '--cpus-per-task="$SLURM_CPUS_ON_NODE"'
        value = str(launcher.nproc_per_node)
    if value == "0":
        return [], ""
    return [f"#SBATCH --cpus-per-task={value}"], f"--cpus-per-task={value}"


def srun_command(launcher: LauncherConfig, *, python: str) -> str:
    """What srun starts once per node (`fft-dist node`) (rendezvous address filled in by the script at run time)."""
    if launcher.use_deepspeed_launcher:
        return deepspeed_srun_command(launcher, python=python)
    if launcher.nodes > 1:
        port = launcher.master_port or SLURM_PORT
        rdzv = (f'--nnodes={launcher.nodes} --rdzv_backend=c10d --rdzv_endpoint="$head:{port}" '
                '--rdzv_id="fft-dist-$SLURM_JOB_ID"')
    elif launcher.master_port:
        rdzv = f"--master_addr=127.0.0.1 --master_port={launcher.master_port}"
    else:
        rdzv = "--standalone"
    return (f"{shlex.quote(python)} -m fft_dist.cli node --nproc_per_node={launcher.nproc_per_node} {rdzv} "
            f"--max_restarts=0 {' '.join(AGENT_FLAGS)}")


def deepspeed_srun_command(launcher: LauncherConfig, *, python: str) -> str:
    """DeepSpeed's runner once per node without ssh (``--no_ssh --node_rank``), under fft-dist's node
    agent, which passes stop signals to the ranks only. ``bash -c`` so that each task reads its own
    ``SLURM_NODEID``."""
    port = launcher.master_port or SLURM_PORT
    addr = '$head' if launcher.nodes > 1 else "127.0.0.1"
    inner = (f"exec {q(python, 'the Python running fft-dist')} -m fft_dist.cli node --deepspeed "
             f"--hostfile=$log_dir/hostfile --no_ssh --node_rank=\\$SLURM_NODEID --master_addr={addr} "
             f"--master_port={port} --module {RANK_MODULE}")
    return f'bash -c "{inner}"'


def sbatch_script(launcher: LauncherConfig, *, run_dir: str, config_path: str, command: list[str],
                  python: str = sys.executable) -> str:
    """The whole script; `command` (the fft-dist invocation that made it) is recorded as a one-line
    comment (a multi-line value, e.g. a chat template, in ANSI-C quotes), so sbatch reads every
    #SBATCH line after it and bash runs nothing of it."""
    log_dir = f"{run_dir}/slurm"
    requeue = (f'if [ "$code" -eq {PREEMPTED} ]; then\n'
               '  echo "fft-dist: pre-empted, checkpoint written; requeueing job $SLURM_JOB_ID"\n'
               '  scontrol requeue "$SLURM_JOB_ID"\nfi\n') if launcher.requeue else ""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in {**launcher.env, CONFIG_ENV: config_path}.items())
    agent = "DeepSpeed's launcher" if launcher.use_deepspeed_launcher else "torchrun's agent"
    cpus = cpu_request(launcher)[1]
    srun_cpus = cpus + " " if cpus else ""
    hostfile = (f"printf '%s slots={launcher.nproc_per_node}\\n' \"${{nodes[@]}}\" > \"$log_dir/hostfile\"  "
                "# DeepSpeed's hostfile: the allocated nodes\n") if launcher.use_deepspeed_launcher else ""
    return (
        "#!/bin/bash\n"
        f"# Generated by: {comment_words(command)}\n"
        f"# One task per node runs `fft-dist node` ({agent} plus fft-dist's stop-signal forwarding);\n"
        "# every rank reads the one resolved config below, so run.dir must be on a shared file system.\n"
        + "\n".join(sbatch_lines(launcher, log_dir=log_dir)) + "\n"
        "set -uo pipefail\n"
        + "".join(line + "\n" for line in launcher.setup)
        + exports
        + f"log_dir={shlex.quote(log_dir)}/\"$SLURM_JOB_ID\"\n"
        'attempt="${SLURM_RESTART_COUNT:-0}"\n'
        'mkdir -p "$log_dir"\n'
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")\n'
        'head="${nodes[0]}"\n'
        + hostfile
        + 'echo "fft-dist: job $SLURM_JOB_ID attempt $attempt on ${nodes[*]}; logs in $log_dir"\n'
        f'srun --ntasks-per-node=1 {srun_cpus}--kill-on-bad-exit=1 --output="$log_dir/attempt-$attempt-node-%t.log" \\\n'
        f"  {srun_command(launcher, python=python)}\n"
        "code=$?\n"
        'echo "fft-dist: job step exited with $code"\n'
        + requeue
        + 'exit "$code"\n'
    )
