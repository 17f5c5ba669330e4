"""optimizer.layer_lr_decay (issue 20) in real processes (tests/support/layer_lr_worker.py, gloo, fp32): one plain
SGD step with gamma = 1 and gamma = 0.5 from the same weights and batch moves every parameter by exactly its
factor's ratio on none, and on 2 ranks under fsdp, zero2 and zero3; three AdamW steps with gamma = 0.5 give the
same losses on every backend. In process: tests/unit/test_layer_lr.py."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, SUPPORT, child_env
from layer_lr_shared import GAMMA, LAYERS, expected

WORKER = SUPPORT / "layer_lr_worker.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def run_worker(out: Path, nproc: int, *backends: str) -> list[dict]:
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--gamma", str(GAMMA), "--layers", str(LAYERS),
           "--backends", *backends]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "layer_lr.json").read_text())


def test_the_update_of_every_parameter_scales_by_its_factor_on_every_backend(tmp_path):
    backends = ["fsdp", "zero2", "zero3"] if HAS_DEEPSPEED else ["fsdp"]
    if not HAS_DEEPSPEED:
        print("deepspeed is not installed: zero2 / zero3 not checked")
    single = run_worker(tmp_path / "none", 1, "none")[0]["none"]
    sharded = run_worker(tmp_path / "sharded", 2, *backends)[0]
    for backend, result in {"none": single, **sharded}.items():
        ratios = result["ratios"]
        assert len(ratios) == 3 + 9 * LAYERS, sorted(ratios)  # embeddings, final norm, head, 9 tensors a layer
        for name, (low, high) in ratios.items():  # 5e-4: fp32 rounding of (1 + Δ) - 1 on the norms' weights
            want = expected(name)
            assert abs(low - want) <= 5e-4 * want and abs(high - want) <= 5e-4 * want, (backend, name, low, high, want)
        worst = max(abs(a - b) / b for a, b in zip(result["losses"], single["losses"]))
        print(f"{backend}: update ratios match gamma^(L-l) for {len(ratios)} tensors; losses {result['losses']} "
              f"(max rel. diff to none {worst:.1e})")
        assert worst <= 1e-5, (backend, result["losses"], single["losses"])
