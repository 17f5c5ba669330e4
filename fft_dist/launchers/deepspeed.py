"""launcher=deepspeed: DeepSpeed's runner as a child, on this machine or on launcher.hosts over ssh."""
from __future__ import annotations

import os
import re
from functools import cached_property

from fft_dist.config.launcher import DeepspeedOptions
from fft_dist.config import ConfigError, LauncherConfig
from fft_dist.launchers.agent import DEEPSPEED_RUNNER, RANK_MODULE, SLURM_PORT, run_deepspeed, threads_per_rank
from fft_dist.launchers.base import Job, Launcher, register
from fft_dist.launchers.shell import comment_words, shell_line

HOST_NAME = re.compile(r"\w[\w.:-]*", re.ASCII)
"""A plain host name or address: one word, no leading '-' (it is written into a hostfile and an ssh command)."""
DS_EXPORT_UNSAFE = frozenset('"$`\\\n\r')
"""DeepSpeed's pdsh runner puts each DS_ENV_FILE value into `export KEY="value";` of a shell command
on every host (multinode_runner.add_export, 0.19): inside double quotes these still mean something."""


def hostfile_text(options: LauncherConfig) -> str:
    return "".join(f"{host} slots={options.nproc_per_node}\n" for host in options.hosts)


def deepspeed_argv(options: LauncherConfig, *, hostfile: str | None, master_port: int) -> list[str]:
    """The deepspeed launcher's command line."""
    argv = list(DEEPSPEED_RUNNER)
    argv.append(f"--hostfile={hostfile}" if hostfile else f"--num_gpus={options.nproc_per_node}")
    if options.include:
        argv.append(f"--include={options.include}")
    if options.exclude:
        argv.append(f"--exclude={options.exclude}")
    return [*argv, f"--master_port={master_port}", "--module", RANK_MODULE]


def deepspeed_env_text(env: dict[str, str]) -> str:
    """DS_ENV_FILE contents: what the deepspeed launcher exports on every host (KEY=VALUE lines)."""
    bad = [k for k, v in env.items() if DS_EXPORT_UNSAFE & set(v)]
    if bad:
        raise ConfigError(f"launcher.env / run.dir {bad}: with launcher.hosts, DeepSpeed's launcher exports each "
                          'value on every host as export KEY="value" in a shell command, where a line break, ", $, ` '
                          "or \\ would be read by that shell; use values without them")
    return "".join(f"{k}={v}\n" for k, v in env.items())


@register
class DeepspeedLauncher(Launcher):
    name = "deepspeed"
    schema = DeepspeedOptions

    def nodes(self) -> int:
        return max(1, len(self.cfg.hosts))

    def ranks_here(self) -> bool:
        return not self.cfg.hosts

    def check(self, backend) -> None:
        if not all(HOST_NAME.fullmatch(host) for host in self.cfg.hosts):
            raise ConfigError(f"launcher.hosts={self.cfg.hosts}: each entry must be a plain host name or address "
                              "(letters, digits, '.', ':', '-', '_'; no spaces, no leading '-')")

    @cached_property
    def master_port(self) -> int:
        """Chosen once, so the dry run shows the port the run uses."""
        from fft_dist.dist import free_port

        return self.cfg.master_port or (SLURM_PORT if self.cfg.hosts else free_port())

    def argv(self, job: Job) -> list[str]:
        hostfile = str(job.run_dir / "hostfile") if self.cfg.hosts else None
        return deepspeed_argv(self.cfg, hostfile=hostfile, master_port=self.master_port)

    def describe(self, job: Job) -> str:
        lch = self.cfg
        hostfile, env_file = (comment_words([str(job.run_dir / f)]) for f in ("hostfile", "deepspeed_env"))
        lines = [f"# {hostfile}: {line}" for line in hostfile_text(lch).splitlines()]
        if lch.hosts:
            lines += [f"# {env_file} (DS_ENV_FILE, exported on every host): {line}"
                      for line in deepspeed_env_text(job.env()).splitlines()]
            env = {"DS_ENV_FILE": str(job.run_dir / "deepspeed_env")}
            return "\n".join([*lines, shell_line(self.argv(job), env)])
        return shell_line(self.argv(job), job.env())

    def run(self, job: Job) -> int:
        lch = self.cfg
        env = {**os.environ, **job.env()}
        argv = self.argv(job)
        if not lch.hosts:  # DeepSpeed's runner leaves OMP_NUM_THREADS unset: each rank would use every CPU
            env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(lch.nproc_per_node)))
        if lch.hosts:
            (job.run_dir / "hostfile").write_text(hostfile_text(lch), encoding="utf-8")
            env_file = job.run_dir / "deepspeed_env"
            env_file.write_text(deepspeed_env_text(job.env()), encoding="utf-8")
            env["DS_ENV_FILE"] = str(env_file)
        print(f"fft-dist: run dir {job.run_dir}; running {shell_line(argv)}", flush=True)
        return run_deepspeed(argv, env, job.forwarder, ranks_here=not lch.hosts)
