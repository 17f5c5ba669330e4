"""Every value that reaches a generated sbatch script or command line is quoted for its context
(issue #15, items 13-14): random values holding newlines, quotes, `$()`, backticks, `;` and leading
dashes are rendered into the sbatch script and the container command; bash parses the script, runs
it (srun/scontrol/sbatch stubbed) without running any injected command, sbatch sees every #SBATCH
line, and the printed container line reads back (shlex) as exactly the argv, with no value in an
option's place. All before launch: pure functions and in-process dry runs, nothing starts."""
from __future__ import annotations

import pytest

from fft_dist.config import LauncherName
from fft_dist.config.launcher import DeepspeedOptions, TorchrunOptions
from fft_dist.launchers.deepspeed import deepspeed_argv
from fft_dist.launchers.torchrun import TorchrunLauncher
from launch_checks import dry, dry_ok, SLURM, hydra_quoted


@pytest.mark.parametrize("override,message", [
    ("launcher.sbatch_lines=['#SBATCH --exclusive\ntouch MARK']", "one line"),
    ("launcher.job_name='a b'", "launcher.job_name"),
    ("launcher.partition='gpu\n#SBATCH --qos=high'", "launcher.partition"),
])
def test_sbatch_values_that_cannot_be_one_safe_line_are_refused(override, message):
    proc = dry(*SLURM, override)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("image", ["--privileged", "-v", "a b", "img\n--privileged"])
def test_an_image_that_would_be_read_as_an_option_is_refused_before_launch(image):
    proc = dry("launcher=container", f"launcher.image={hydra_quoted(image)}")
    assert proc.returncode == 2 and "launcher.image" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_run_dir_the_volume_option_cannot_hold_is_refused(tmp_path):
    proc = dry("launcher=container", "launcher.image=i", f"run.dir={tmp_path}/a:b")
    assert proc.returncode == 2 and "run.dir" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_values_starting_with_a_dash_stay_values_for_torchrun_and_deepspeed():
    """torchrun's and DeepSpeed's own argparse read the attached forms back as the values."""
    from deepspeed.launcher.runner import parse_args
    from torch.distributed.run import get_args_parser

    lch = TorchrunOptions(name=LauncherName.torchrun, nnodes=2, rdzv_endpoint="-h:1", rdzv_id="-x", local_addr="-a")
    args = get_args_parser().parse_args([*TorchrunLauncher(lch).agent_args(), "-m", "fft_dist.train"])
    assert (args.rdzv_endpoint, args.rdzv_id, args.local_addr, args.nnodes) == ("-h:1", "-x", "-a", "2")
    assert args.training_script == "fft_dist.train" and args.module
    ds = DeepspeedOptions(name=LauncherName.deepspeed, include="-n1:0", exclude="--evil")
    argv = deepspeed_argv(ds, hostfile="-hostfile", master_port=29500)
    args = parse_args(argv[3:])
    assert (args.include, args.exclude, args.hostfile, args.user_script) == ("-n1:0", "--evil", "-hostfile",
                                                                            "fft_dist.train")


@pytest.mark.parametrize("hosts", ["['-oProxyCommand=x']", "['n1 slots=99']", "['n1\nn2']"])
def test_deepspeed_hosts_must_be_plain_host_names(hosts):
    proc = dry("launcher=deepspeed", "parallelism=zero2", f"launcher.hosts={hosts}")
    assert proc.returncode == 2 and "launcher.hosts" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["$(touch MARK)", "`touch MARK`", 'a" ; touch MARK ; "b', "a\ntouch MARK"])
def test_env_values_deepspeed_would_export_through_a_remote_shell_are_refused(value, tmp_path):
    """DeepSpeed's pdsh runner writes export KEY="value"; into the command each host's shell runs."""
    proc = dry("launcher=deepspeed", "parallelism=zero2", "launcher.hosts=[n1,n2]", "train.global_batch_size=16",
               f"run.dir={tmp_path}/r", f"+launcher.env.X={hydra_quoted(value)}")
    assert proc.returncode == 2 and "['X']" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert dry_ok("launcher=deepspeed", "parallelism=zero2", "launcher.hosts=[n1,n2]", "train.global_batch_size=16",
                  f"run.dir={tmp_path}/r", "+launcher.env.X='a b,c'")
