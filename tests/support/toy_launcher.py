"""A launcher defined outside fft_dist, added the way any launcher is: one module registering its class
through :func:`fft_dist.launchers.register`, plus ``toy_conf/launcher/toy.yaml``. It runs the job's one
rank as a plain child process, reading the config.yaml that ``fft-dist launch`` wrote."""
from __future__ import annotations

import os
import subprocess
import sys

from fft_dist.launchers import Job, Launcher, register
from fft_dist.launchers.shell import shell_line
from fft_dist.preemption import RANK_MODULE


@register
class ToyLauncher(Launcher):
    name = "toy"
    supervises = False  # a test process must not name itself the ranks' supervisor

    def argv(self) -> list[str]:
        return [sys.executable, "-m", RANK_MODULE]

    def describe(self, job: Job) -> str:
        return "# toy launcher: the one rank as a child process\n" + shell_line(self.argv(), job.env())

    def run(self, job: Job) -> int:
        env = {**os.environ, **job.env(), "LOCAL_RANK": "0"}
        print(f"fft-dist: run dir {job.run_dir}; toy launcher starting {shell_line(self.argv())}", flush=True)
        return subprocess.run(self.argv(), env=env, check=False).returncode
