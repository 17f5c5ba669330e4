"""Model, backend and tracker settings that used to fail inside a rank (a traceback, exit 1) are
refused before launch with exit 2 (issue #15, items 15 and 17): a model folder with custom code
(never run, never prompted for), attention heads, data.max_length past the model's positions,
nccl without CUDA, flash attention without its package or GPUs, W&B online without an API key.
Dry runs (in-process, nothing starts) except where the real entry point's behaviour is the point."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO, child_env, fft_dist
from model_checks_shared import custom_code_folder, no_cuda


def test_a_model_folder_with_custom_code_is_refused_before_launch_without_a_prompt(tmp_path):
    marker = tmp_path / "MARKER"
    folder = custom_code_folder(tmp_path / "model", marker)
    run = tmp_path / "run"
    # a real start, stdin a pipe that answers every y/N question with y
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", "train", f"model.path={folder}", f"run.dir={run}",
                           "parallelism=none", "launcher.nproc_per_node=1"], cwd=REPO, input="y\n" * 20,
                          env=child_env(HF_MODULES_CACHE=str(tmp_path / "modules")), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "fft-dist never runs code from a model folder" in proc.stderr and "auto_map" in proc.stderr
    assert "trust_remote_code=True" not in proc.stdout + proc.stderr and "[y/N]" not in proc.stdout + proc.stderr
    assert not marker.exists(), "the folder's code ran"
    assert not run.exists(), "refused before launch: no run directory"


@no_cuda
def test_nccl_without_cuda_at_rank_start_is_exit_2_not_a_traceback(tmp_path):
    """A rank started by the user's own launcher (RANK/WORLD_SIZE set): the check in init_distributed."""
    proc = subprocess.run([sys.executable, "-m", "fft_dist.train", "dist.backend=nccl", "parallelism=none",
                           f"run.dir={tmp_path}/r"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=child_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "dist.backend=nccl needs CUDA" in proc.stderr


def test_the_cli_reports_a_model_error_before_launch(tmp_path):
    """One real `fft-dist launch` (no dry run): refused in the launcher, nothing written."""
    proc = fft_dist("launch", "model=gpt2", "data.max_length=4096", f"run.dir={tmp_path}/r", timeout=120)
    assert proc.returncode == 2 and "n_positions=1024" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()
