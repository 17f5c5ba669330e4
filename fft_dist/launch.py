"""Launching: resolve the config once, check everything cheap, then start (or submit) the ranks.

``fft-dist launch`` (``fft-dist train`` is its ``launcher=local`` form) resolves and validates the
config in one process, runs the pre-launch checks (config, backend, data, resume path, run
directory), writes ``run.dir/config.yaml`` and hands the job to the chosen launcher: torchrun's
agent in this process (local, torchrun), the deepspeed launcher, ``sbatch`` or a container
engine (:mod:`fft_dist.launch_plan` and :mod:`fft_dist.launch_slurm` build what they run).
Every rank reads that file (:data:`CONFIG_ENV`). Under a user's own torchrun or deepspeed
launcher, each rank composes the overrides and rank 0's resolution is broadcast, so ``${now:}``
and the like cannot differ between ranks. ``python -m fft_dist.train`` is the worker entry point.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from fft_dist import exit_codes
from fft_dist import launch_plan as plan
from fft_dist.compose import Prepared, compose, override_keys, report_known, resolve, to_typed, to_yaml
from fft_dist.config import BatchPlan, ConfigError, FFTConfig, LauncherConfig, LauncherName
from fft_dist.launch_plan import check_launcher, world_size
from fft_dist.preemption import (SignalForwarder, StartupInterrupted, StopSignal, become_supervisor,
                                 ignore_forwarded_signals, set_parent_death_signal, signal_name)
from fft_dist.validate import validate
from fft_dist.worker import CONFIG_ENV, STOPPED_ENV, run_worker


def launched_by_launcher() -> bool:
    """True when a launcher (torchrun, deepspeed, srun+torchrun) already started us as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` that the deepspeed launcher appends (Hydra rejects them).

    LOCAL_RANK is also in the environment, which is what we read.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        out.append(arg)
    return out


def preflight(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Checks that need a package or a file but no process group: run before any rank starts."""
    from fft_dist.checkpoint import find_resume
    from fft_dist.checkpoint.layout import check_latest_slot
    from fft_dist.data import check_data_files
    from fft_dist.dist import check_backend
    from fft_dist.launch_plan import ranks_on_this_machine
    from fft_dist.metrics import check_logging
    from fft_dist.model import check_model
    from fft_dist.models.conversions import check_pretrained_layout
    from fft_dist.strategy import check as check_strategy

    check_strategy(cfg, plan)
    check_logging(cfg)
    check_data_files(cfg.data)
    here = ranks_on_this_machine(cfg.launcher)
    if here:
        check_backend(cfg.dist.backend)
    check_model(cfg, ranks_here=here, our_packages=cfg.launcher.name != LauncherName.container)
    check_pretrained_layout(cfg)
    check_latest_slot(Path(cfg.checkpoint.dir))
    if cfg.resume not in ("none", "auto"):
        find_resume(cfg.resume, Path(cfg.checkpoint.dir))


def train_command(overrides: list[str], *, config_dirs: list[str] | None = None) -> int:
    """``fft-dist train``: a rank when a launcher started us, else ``fft-dist launch launcher=local``."""
    overrides = strip_launcher_args(overrides)
    if launched_by_launcher():
        from fft_dist.dist import exit_rank

        exit_rank(run_worker(overrides))
    return launch_command(overrides, config_dirs=config_dirs, only_local=True)


def launch_command(overrides: list[str], *, config_dirs: list[str] | None = None, only_local: bool = False) -> int:
    """``fft-dist launch``: resolve once, check, write run.dir/config.yaml, then run or submit the job."""
    forwarder = StopForwarder()
    try:
        return _launch(overrides, config_dirs, forwarder, only_local=only_local)
    except StartupInterrupted as e:
        print(f"fft-dist: received {e}; stopped before any rank started (nothing trained, nothing saved)",
              file=sys.stderr, flush=True)
        return exit_codes.STOPPED_NO_CHECKPOINT


def node_command(argv: list[str]) -> int:
    """``fft-dist node <torchrun args>`` (or ``node --deepspeed <runner args>``): one node's agent
    (SLURM, containers) for an already written config."""
    if not os.environ.get(CONFIG_ENV):
        print(f"fft-dist node: set {CONFIG_ENV} to the run's config.yaml (fft-dist launch writes it)",
              file=sys.stderr, flush=True)
        return exit_codes.CONFIG_ERROR
    try:
        _lock_for_slurm_job()
        if argv[:1] == ["--deepspeed"]:  # DeepSpeed's runner leaves OMP_NUM_THREADS unset: set it for its ranks
            from fft_dist.compose import load_yaml

            nproc = load_yaml(os.environ[CONFIG_ENV]).launcher.nproc_per_node
            os.environ.setdefault("OMP_NUM_THREADS", str(plan.threads_per_rank(nproc)))
    except ConfigError as e:
        return report_known(e)
    become_supervisor()
    if argv[:1] == ["--deepspeed"]:
        return run_deepspeed([*plan.DEEPSPEED_RUNNER, *argv[1:]], dict(os.environ), StopForwarder())
    return start_agent(argv, StopForwarder())


def _lock_for_slurm_job() -> None:
    """A SLURM job's first node holds the run's locks while its ranks run (``fft-dist launch`` only
    submitted the job and is gone): a second job on the same run.dir or checkpoint.dir is refused."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_NODEID", "0") != "0":
        return
    from fft_dist.compose import load_yaml
    from fft_dist.rundir import lock_run

    lock_run(load_yaml(os.environ[CONFIG_ENV]))


def run_deepspeed(argv: list[str], env: dict[str, str], forwarder: SignalForwarder, *, ranks_here: bool = True) -> int:
    """DeepSpeed's runner as a child; its exit code (the first failed rank's, e.g. 75) is the job's.

    With the ranks on this machine, stop signals go to the ranks only: the runner and its launch
    process would kill them without a checkpoint. So the runner gets its own session (a Ctrl-C to
    the terminal's process group misses it) and ignores SIGUSR1/SIGHUP, which SLURM sends to every
    process of a job step. On other hosts (ssh) the signal can only go to the runner.
    """
    if ranks_here:
        forwarder.forward_to_ranks_below()

    def child_setup() -> None:  # the runner dies with us, so it cannot outlive its supervisor
        set_parent_death_signal()
        if ranks_here:
            ignore_forwarded_signals()

    proc = subprocess.Popen(argv, env=env, start_new_session=ranks_here, preexec_fn=child_setup)
    try:
        code = proc.wait()
    except StartupInterrupted:  # no rank yet: stop the runner and what it started
        if ranks_here:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait()
        raise
    return 128 - code if code < 0 else code


class StopForwarder(SignalForwarder):
    """Also tells ranks that torchrun restarts after a stop signal to stop at once (they inherit our env)."""

    def _handle(self, signum: int, frame) -> None:
        os.environ.setdefault(STOPPED_ENV, signal_name(signum))
        super()._handle(signum, frame)


def _resolve(overrides: list[str], config_dirs: list[str] | None, *, only_local: bool) -> Prepared:
    """Compose, resolve and type once; validate against the whole job's world size."""
    cfg_node = resolve(compose(overrides, config_dirs=config_dirs))
    cfg = to_typed(cfg_node)
    if only_local and cfg.launcher.name != LauncherName.local:
        raise ConfigError(f"fft-dist train starts ranks on this machine (launcher=local); for "
                          f"launcher={cfg.launcher.name.value} use `fft-dist launch`")
    check_launcher(cfg.launcher, cfg.parallelism.name)
    return Prepared(cfg, to_yaml(cfg_node), validate(cfg, world_size(cfg.launcher)))


def _launch(overrides: list[str], config_dirs: list[str] | None, forwarder: SignalForwarder, *,
            only_local: bool) -> int:
    from fft_dist.rundir import prepare_run_dir

    try:
        prepared = _resolve(overrides, config_dirs, only_local=only_local)
        cfg, launcher = prepared.cfg, prepared.cfg.launcher
        preflight(cfg, prepared.plan)
        secondary = launcher.name == LauncherName.torchrun and launcher.node_rank > 0
        if secondary and "run.dir" not in override_keys(overrides):
            raise ConfigError("launcher.node_rank > 0 reads node 0's run.dir/config.yaml: pass the same explicit "
                              "run.dir=<shared folder> on every node")
        job = Job(launcher, Path(cfg.run.dir).resolve(), ["fft-dist", "launch", *overrides])
        text = job.describe()  # checks what only rendering finds (e.g. an #SBATCH value that needs quoting)
        if not (launcher.dry_run or secondary):
            prepare_run_dir(cfg, prepared.yaml)
    except Exception as e:  # noqa: BLE001 - known errors get their exit code, bugs their traceback
        return report_known(e)
    if launcher.dry_run:
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `... | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w", encoding="utf-8")
        return exit_codes.OK
    return job.run(forwarder)


class Job:
    """The command (or script) one launcher runs for a resolved config in `run_dir`."""

    def __init__(self, launcher: LauncherConfig, run_dir: Path, command: list[str]):
        self.launcher, self.run_dir, self.command = launcher, run_dir, command
        self.config_path = run_dir / "config.yaml"
        self.name = launcher.name
        self.master_port = launcher.master_port or (
            plan.SLURM_PORT if launcher.hosts else plan.free_port()) if self.name == LauncherName.deepspeed else 0

    def env(self) -> dict[str, str]:
        return {CONFIG_ENV: str(self.config_path), **self.launcher.env}

    def describe(self) -> str:
        """Exactly what `run` would do, as shell text (stdout of a dry run)."""
        lch = self.launcher
        if self.in_process():
            return ("# one rank: fft-dist runs it in its own process (no torchrun), which is equivalent to\n"
                    + plan.shell_line([sys.executable, "-m", "fft_dist.train"], self.env()))
        if self.name in (LauncherName.local, LauncherName.torchrun):
            argv = [sys.executable, "-m", "torch.distributed.run", *plan.torchrun_args(lch), "-m", "fft_dist.train"]
            return ("# fft-dist runs this through torch.distributed.run's API, forwarding stop signals to the ranks\n"
                    + plan.shell_line(argv, self.env()))
        if self.name == LauncherName.deepspeed:
            hostfile, env_file = (plan.comment_words([str(self.run_dir / f)]) for f in ("hostfile", "deepspeed_env"))
            lines = [f"# {hostfile}: {line}" for line in plan.hostfile_text(lch).splitlines()]
            if lch.hosts:
                lines += [f"# {env_file} (DS_ENV_FILE, exported on every host): {line}"
                          for line in plan.deepspeed_env_text(self.env()).splitlines()]
                env = {"DS_ENV_FILE": str(self.run_dir / "deepspeed_env")}
                return "\n".join([*lines, plan.shell_line(self._deepspeed_argv(), env)])
            return plan.shell_line(self._deepspeed_argv(), self.env())
        if self.name == LauncherName.slurm:
            return self.sbatch_script().rstrip("\n")
        return plan.shell_line(self._container_argv())

    def _deepspeed_argv(self) -> list[str]:
        hostfile = str(self.run_dir / "hostfile") if self.launcher.hosts else None
        return plan.deepspeed_argv(self.launcher, hostfile=hostfile, master_port=self.master_port)

    def _container_argv(self) -> list[str]:
        return plan.container_argv(self.launcher, run_dir=str(self.run_dir), config_path=str(self.config_path))

    def sbatch_script(self) -> str:
        from fft_dist.launch_slurm import sbatch_script

        return sbatch_script(self.launcher, run_dir=str(self.run_dir), config_path=str(self.config_path),
                             command=self.command)

    def in_process(self) -> bool:
        """launcher=local with one rank and no launcher.env: the rank runs in this process.

        A second interpreter (torchrun's agent plus a rank importing torch and transformers again)
        cost ~2 s of start-up for nothing (bench/RESULTS.md, start-up). launcher.env keeps the
        separate rank process: variables such as LD_PRELOAD or MALLOC_* only act on a new process.
        """
        lch = self.launcher
        return self.name == LauncherName.local and lch.nproc_per_node == 1 and not lch.env

    def run(self, forwarder: SignalForwarder) -> int:
        lch = self.launcher
        if self.name != LauncherName.container:  # in a container, its own node agent supervises the ranks
            become_supervisor()
        if self.in_process():
            os.environ.update(self.env())
            print(f"fft-dist: run dir {self.run_dir}; running 1 rank in this process", flush=True)
            return run_in_process(lch)
        if self.name in (LauncherName.local, LauncherName.torchrun):
            os.environ.update(self.env())
            nodes = f" (node {lch.node_rank} of {lch.nnodes})" if lch.nnodes > 1 else ""
            print(f"fft-dist: run dir {self.run_dir}; starting {lch.nproc_per_node} rank(s){nodes}", flush=True)
            return start_agent(plan.torchrun_args(lch), forwarder)
        if self.name == LauncherName.slurm:
            return self._submit()
        env = {**os.environ, **self.env()}
        if self.name == LauncherName.deepspeed:
            argv = self._deepspeed_argv()
            if not lch.hosts:  # DeepSpeed's runner leaves OMP_NUM_THREADS unset: each rank would use every CPU
                env.setdefault("OMP_NUM_THREADS", str(plan.threads_per_rank(lch.nproc_per_node)))
            if lch.hosts:
                (self.run_dir / "hostfile").write_text(plan.hostfile_text(lch), encoding="utf-8")
                env_file = self.run_dir / "deepspeed_env"
                env_file.write_text(plan.deepspeed_env_text(self.env()), encoding="utf-8")
                env["DS_ENV_FILE"] = str(env_file)
            print(f"fft-dist: run dir {self.run_dir}; running {plan.shell_line(argv)}", flush=True)
            return run_deepspeed(argv, env, forwarder, ranks_here=not lch.hosts)
        argv = self._container_argv()
        print(f"fft-dist: run dir {self.run_dir}; running {plan.shell_line(argv)}", flush=True)
        return subprocess.run(argv, env=env, check=False).returncode

    def _submit(self) -> int:
        from fft_dist.rundir import release_locks

        script = self.run_dir / "slurm" / "job.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(self.sbatch_script(), encoding="utf-8")
        release_locks()  # the job's first node takes them: it may start before this process exits
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"fft-dist: sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
            return exit_codes.CONFIG_ERROR
        job_id = proc.stdout.strip().split(";")[0]
        print(f"fft-dist: submitted SLURM job {job_id}\n  script:   {script}\n"
              f"  job log:  {script.parent / (job_id + '.out')}\n"
              f"  rank logs: {script.parent / job_id}/attempt-<n>-node-<i>.log\n  run dir:  {self.run_dir}", flush=True)
        return exit_codes.OK


def run_in_process(launcher: LauncherConfig) -> int:
    """Be the job's only rank: what torchrun's agent would start, without a second process.

    The rank's stop-signal handler replaces the launcher's here, so a stop signal from now on
    finishes the step, checkpoints and exits 75, as it does for a rank under the agent; before it,
    the launcher's handler reports that nothing started (76). RANK stays unset: the rank must not
    die with the user's shell (die_with_parent is for ranks under a launcher).
    """
    from fft_dist.dist import exit_rank

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # torchrun would set them afresh; a stray WORLD_SIZE must not count
    os.environ["LOCAL_RANK"] = "0"  # what torchrun gives its only rank (DeepSpeed reads it to pick the device)
    if launcher.master_port:
        os.environ["MASTER_PORT"] = str(launcher.master_port)  # init_distributed keeps a set port
    if "OMP_NUM_THREADS" not in os.environ:  # what start_agent gives one rank; torch is imported already
        import torch

        os.environ["OMP_NUM_THREADS"] = str(plan.threads_per_rank(1))
        torch.set_num_threads(plan.threads_per_rank(1))
    stop = StopSignal()
    exit_rank(run_worker([], stop=stop))  # like a rank: gloo may abort in interpreter finalisation
    return exit_codes.OK  # not reached


def start_agent(torchrun_argv: list[str], forwarder: SignalForwarder) -> int:
    """Run torchrun's agent in this process (ranks read :data:`CONFIG_ENV`); return the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*torchrun_argv, "-m", "fft_dist.train"])
    nproc = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(plan.threads_per_rank(nproc)))
    # Our forwarder handles the stop signals; torchrun's handler would kill the ranks mid-save.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        return job_exit_code(e.failures, forwarder)
    return exit_codes.OK


def job_exit_code(failures: dict, forwarder: SignalForwarder) -> int:
    """The exit code of the rank that failed first (the others were stopped because of it)."""
    first = min(failures.values(), key=lambda f: f.timestamp)
    code = first.exitcode
    if code in exit_codes.DOCUMENTED:
        return code
    if code < 0:
        print(f"fft-dist: rank {first.local_rank} was killed by {signal_name(-code)}"
              f"{' (after ' + signal_name(forwarder.received) + ')' if forwarder.received else ''}",
              file=sys.stderr, flush=True)
        return 128 - code
    print(f"fft-dist: rank {first.local_rank} failed with exit code {code}; see its messages above",
          file=sys.stderr, flush=True)
    return code


