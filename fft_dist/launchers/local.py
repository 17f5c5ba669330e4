"""launcher=local (``fft-dist train``): the ranks on this machine; one rank runs in this very process."""
from __future__ import annotations

import os
import sys

from fft_dist.launchers.agent import RANK_MODULE
from fft_dist.launchers.base import Job, register
from fft_dist.launchers.shell import shell_line
from fft_dist.launchers.torchrun import AgentLauncher


@register
class LocalLauncher(AgentLauncher):
    name = "local"

    def in_process(self) -> bool:
        """One rank and no launcher.env: the rank runs in this process.

        A second interpreter (torchrun's agent plus a rank importing torch and transformers again)
        cost ~2 s of start-up for nothing (bench/RESULTS.md, start-up). launcher.env keeps the
        separate rank process: variables such as LD_PRELOAD or MALLOC_* only act on a new process.
        """
        return self.cfg.nproc_per_node == 1 and not self.cfg.env

    def describe(self, job: Job) -> str:
        if not self.in_process():
            return super().describe(job)
        return ("# one rank: fft-dist runs it in its own process (no torchrun), which is equivalent to\n"
                + shell_line([sys.executable, "-m", RANK_MODULE], job.env()))

    def run(self, job: Job) -> int:
        if not self.in_process():
            return super().run(job)
        os.environ.update(job.env())
        print(f"fft-dist: run dir {job.run_dir}; running 1 rank in this process", flush=True)
        return job.rank_here()
