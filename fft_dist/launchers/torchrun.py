"""launcher=torchrun: torchrun's agent in this process, on one machine or one of several (c10d rendezvous)."""
from __future__ import annotations

import os
import sys

from fft_dist.config.launcher import TorchrunOptions
from fft_dist.config import ConfigError, LauncherConfig
from fft_dist.launchers.agent import AGENT_FLAGS, RANK_MODULE, start_agent
from fft_dist.launchers.base import Job, Launcher, register
from fft_dist.launchers.shell import shell_line


def torchrun_args(options: LauncherConfig, *, nodes: int = 1, max_restarts: int = 0) -> list[str]:
    """torchrun's arguments (up to the module) for this node of a job on `nodes` machines.

    Options take their values attached (``--rdzv_id=<id>``), so a value starting with '-' stays a value.
    """
    args = [f"--nproc_per_node={options.nproc_per_node}"]
    if nodes > 1:
        args += [f"--nnodes={options.nnodes}", f"--node_rank={options.node_rank}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={options.rdzv_endpoint}", f"--rdzv_id={options.rdzv_id}",
                 # c10d cannot tell which node hosts the store when all nodes share a hostname; say it
                 f"--rdzv_conf=is_host={str(options.node_rank == 0).lower()}"]
        if options.local_addr:
            args.append(f"--local_addr={options.local_addr}")
    elif options.master_port:
        args += ["--master_addr=127.0.0.1", f"--master_port={options.master_port}"]
    else:
        args += ["--standalone"]
    return [*args, f"--max_restarts={max_restarts}", *AGENT_FLAGS]


class AgentLauncher(Launcher):
    """Ranks started by torchrun's agent, run through its API in this process (local and torchrun)."""

    def agent_args(self) -> list[str]:
        return torchrun_args(self.cfg)

    def describe(self, job: Job) -> str:
        argv = [sys.executable, "-m", "torch.distributed.run", *self.agent_args(), "-m", RANK_MODULE]
        return ("# fft-dist runs this through torch.distributed.run's API, forwarding stop signals to the ranks\n"
                + shell_line(argv, job.env()))

    def run(self, job: Job) -> int:
        lch = self.cfg
        os.environ.update(job.env())
        nodes = f" (node {lch.node_rank} of {lch.nnodes})" if self.nodes() > 1 else ""
        print(f"fft-dist: run dir {job.run_dir}; starting {lch.nproc_per_node} rank(s){nodes}", flush=True)
        return start_agent(self.agent_args(), job.forwarder)


@register
class TorchrunLauncher(AgentLauncher):
    name = "torchrun"
    schema = TorchrunOptions

    def nodes(self) -> int:
        return self.cfg.nnodes

    def first_node(self) -> bool:
        return self.cfg.node_rank == 0

    def agent_args(self) -> list[str]:
        return torchrun_args(self.cfg, nodes=self.cfg.nnodes, max_restarts=self.cfg.max_restarts)

    def check(self, backend) -> None:
        lch = self.cfg
        rules = [
            (lch.nnodes >= 1 and 0 <= lch.node_rank < lch.nnodes,
             f"launcher.node_rank={lch.node_rank} must be in 0..launcher.nnodes-1 (nnodes={lch.nnodes})"),
            (lch.nnodes == 1 or ":" in lch.rdzv_endpoint,
             "launcher.nnodes > 1 needs launcher.rdzv_endpoint=<node 0 address>:<port> (c10d rendezvous)"),
            (lch.max_restarts >= 0, "launcher.max_restarts must be >= 0"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
