"""Model-family conformance (issue #16): every family of tests/support/families.py, trained from a
``save_pretrained`` folder (``model.path``) with the real trainer, on every backend.

Each backend runs as ONE job (tests/support/family_worker.py: one process group, fp32, gloo, 2 ranks; ``none``
one process) that loops over its families, so the ranks' start-up is paid once per backend. Each
family: 3 steps with a checkpoint every step, then a resume from step 2 that runs step 3 again. The
checks (tests/support/family_checks.py) then run here, row by row: step 1 against ``from_pretrained`` plus a
forward, the backends against ``none``, the exact resume, and the HF export's logits and key set. All
rows are checked before the test asserts once, with the whole table (family x check) in the message.

Split (measured on 2 shared CPU cores, see the README's Model families):
- ``none`` x 1 and ``fsdp`` x 2: every family, one job each;
- ``zero3`` x 2 and ``zero2`` x 2: three representative families (untied dense llama, tied qwen2, MoE
  qwen2_moe), one job each; the other nine under ``slow`` (one job each).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from families import BY_NAME, FAMILIES, REPRESENTATIVE
from family_checks import check_row, failed, first_batch_loss, read_worker_output, table
from helpers import REPO, child_env, SUPPORT


WORKER = SUPPORT / "family_worker.py"
ALL = [f.name for f in FAMILIES]
OTHERS = [name for name in ALL if name not in REPRESENTATIVE]
JOB = [
    "train.precision=fp32", "train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
    "train.lr=1e-3", "train.warmup_steps=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3",
    "data.max_length=64", "data.max_examples=256", "data.eval_fraction=0", "eval.every_steps=0",
]
"""The job of every row (with the default shipped data, stdlib_docstrings): 3 steps, fp32, global batch 4."""


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


needs_deepspeed = pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed")


class Suite:
    """The jobs and references of this module: folders and tokenised data are made once."""

    def __init__(self, folders, root: Path):
        self.folders, self.root = folders, root
        self.job = [*JOB, f"data.cache_dir={root / 'data-cache'}"]
        self._references: dict[str, float | str] = {}
        self._none: tuple[dict, float, str] | None = None

    def launch(self, backend: str, names: list[str]) -> tuple[dict, float, str]:
        """(family -> the worker's record, wall seconds of the job, why the job failed or '')."""
        root = self.root / f"{backend}-{names[0]}"
        root.mkdir(parents=True)
        families = [{"name": n, "folder": str(self.folders(n)), "root": str(root / n),
                     "overrides": list(BY_NAME[n].overrides)} for n in names]
        spec, out = root / "spec.json", root / "out.json"
        spec.write_text(json.dumps({"overrides": [f"parallelism={backend}", *self.job], "families": families}))
        ranks = [sys.executable] if backend == "none" else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        start = time.perf_counter()
        proc = subprocess.run([*ranks, str(WORKER), "--spec", str(spec), "--out", str(out)], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - start
        (root / "stdout.log").write_text(proc.stdout)
        (root / "stderr.log").write_text(proc.stderr)
        problem = "" if proc.returncode == 0 else (
            f"the {backend} job exited {proc.returncode}\n--- stderr (tail)\n{proc.stderr[-3000:]}")
        return read_worker_output(out)["families"], seconds, problem

    def none(self) -> tuple[dict, float, str]:
        """parallelism=none over every family: the baseline every backend is compared with."""
        if self._none is None:
            self._none = self.launch("none", ALL)
        return self._none

    def reference(self, name: str) -> float | str:
        """from_pretrained + forward loss on the first global batch (or why there is none)."""
        if name not in self._references:
            family = BY_NAME[name]
            try:
                self._references[name] = first_batch_loss(
                    self.folders(name), ["parallelism=none", *self.job, *family.overrides], family.attn_implementation)
            except Exception as e:  # noqa: BLE001 - shown in the row
                self._references[name] = f"{type(e).__name__}: {e}".splitlines()[0]
        return self._references[name]


@pytest.fixture(scope="module")
def suite(family_folders, tmp_path_factory) -> Suite:
    return Suite(family_folders, tmp_path_factory.mktemp("family-runs"))


def check_backend(suite: Suite, backend: str, names: list[str], work: Path) -> None:
    runs, seconds, problem = suite.none() if backend == "none" else suite.launch(backend, names)
    baseline = None if backend == "none" else suite.none()[0]
    rows = {}
    for name in names:
        row = check_row(runs.get(name), reference=suite.reference(name),
                        baseline=None if baseline is None else baseline.get(name, {}),
                        attn_implementation=BY_NAME[name].attn_implementation, work=work / name,
                        folder=suite.folders(name))
        rows[name] = {check: value.replace(str(suite.folders(name)), "<model.path>") if isinstance(value, str) else value
                      for check, value in row.items()}
    report = table(backend, rows, seconds)
    print(report)
    for name in names:  # the tracebacks go to the captured output only
        if runs.get(name, {}).get("detail"):
            print(f"--- {name} / {backend}: {runs[name]['detail']}")
    assert not problem and not failed(rows), f"\n{report}\n{problem}"


def test_none_every_family(suite, tmp_path):
    check_backend(suite, "none", ALL, tmp_path)


def test_fsdp_every_family(suite, tmp_path):
    check_backend(suite, "fsdp", ALL, tmp_path)


@needs_deepspeed
@pytest.mark.parametrize("backend", ["zero3", "zero2"])
def test_deepspeed_representative_families(suite, tmp_path, backend):
    check_backend(suite, backend, list(REPRESENTATIVE), tmp_path)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("backend", ["zero3", "zero2"])
def test_deepspeed_other_families(suite, tmp_path, backend):
    check_backend(suite, backend, OTHERS, tmp_path)
