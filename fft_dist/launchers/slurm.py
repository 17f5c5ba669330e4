"""launcher=slurm: write run.dir/slurm/job.sbatch (one node agent per node through srun) and submit it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fft_dist import exit_codes
from fft_dist.config.launcher import SlurmOptions
from fft_dist.config import ConfigError
from fft_dist.launchers.base import Job, Launcher, register
from fft_dist.launchers.sbatch import sbatch_script
from fft_dist.launchers.shell import one_line


@register
class SlurmLauncher(Launcher):
    name = "slurm"
    schema = SlurmOptions
    submit_with = "sbatch"

    def nodes(self) -> int:
        return self.cfg.nodes

    def ranks_here(self) -> bool:
        return False

    def check(self, backend) -> None:
        lch = self.cfg
        rules = [
            (lch.nodes >= 1 and lch.gpus_per_node >= 0, "launcher.nodes must be >= 1, launcher.gpus_per_node >= 0"),
            (lch.cpus_per_task == "auto" or lch.cpus_per_task.isdigit(),
             f"launcher.cpus_per_task={lch.cpus_per_task!r}: use auto (whole nodes with GPUs, one CPU per rank "
             "without), a number of CPUs for the task of each node, or 0 (no request)"),
            (lch.signal_lead_s >= 0, "launcher.signal_lead_s must be >= 0 (0: no --signal line)"),
            (all(line.startswith("#SBATCH ") and one_line(line) for line in lch.sbatch_lines),
             f"launcher.sbatch_lines must each be one line starting with '#SBATCH ': {lch.sbatch_lines}"),
            (not lch.use_deepspeed_launcher or backend.deepspeed_stage is not None,
             f"launcher.use_deepspeed_launcher=true starts DeepSpeed's launcher, for the ZeRO backends (those "
             f"DeepSpeed's engine runs); with parallelism={backend.name} keep the default (torchrun's agent per node)"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)

    def script(self, job: Job) -> str:
        return sbatch_script(self.cfg, run_dir=str(job.run_dir), config_path=str(job.config_path),
                             command=job.command)

    def describe(self, job: Job) -> str:
        return self.script(job).rstrip("\n")

    def write(self, job: Job) -> list[Path]:
        script = job.run_dir / "slurm" / "job.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(self.script(job), encoding="utf-8")
        return [script]

    def run(self, job: Job) -> int:
        script = self.write(job)[0]
        job.release_locks()  # the job's first node takes them: it may start before this process exits
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"fft-dist: sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
            return exit_codes.CONFIG_ERROR
        job_id = proc.stdout.strip().split(";")[0]
        print(f"fft-dist: submitted SLURM job {job_id}\n  script:   {script}\n"
              f"  job log:  {script.parent / (job_id + '.out')}\n"
              f"  rank logs: {script.parent / job_id}/attempt-<n>-node-<i>.log\n  run dir:  {job.run_dir}", flush=True)
        return exit_codes.OK
