"""parallelism=hsdp end to end (real processes, gloo, fp32): FSDP2 on a 2 x 2 mesh (shard_size=2, 4 ranks).

One HSDP run serves every check: its losses match a single process's; its checkpoint has every range
written by exactly one rank (the second replica group writes empty shards); and it resumes under fsdp x 2
and zero3 x 2 with the uninterrupted run's losses (as tests/e2e/test_checkpoint_runs.py does for fsdp).
"""
from __future__ import annotations

import json
import struct
from collections import Counter

import pytest

from helpers import assert_close_rel
from checkpoint_runs import losses_by_step, torchrun_train

HSDP = ("parallelism.shard_size=2",)


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory):
    """hsdp, 4 ranks as 2 replicas x 2 shards, 8 steps (micro 1, accumulation 1), checkpoints at 4 and 8."""
    run = tmp_path_factory.mktemp("hsdp") / "run"
    torchrun_train(run, *HSDP, nproc=4, parallelism="hsdp")
    return run


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """parallelism=none, 1 process, the same 8 steps (accumulation 4)."""
    run = tmp_path_factory.mktemp("none") / "run"
    torchrun_train(run, nproc=1, parallelism="none")
    return run


def test_hsdp_matches_a_single_process(hsdp_run, reference_run):
    hsdp, ref = losses_by_step(hsdp_run), losses_by_step(reference_run)
    assert sorted(hsdp) == sorted(ref) == list(range(1, 9))
    diff = max(abs(hsdp[s] - ref[s]) for s in ref)
    print(f"hsdp 2x2 vs none: max loss diff {diff:.3g}")
    assert_close_rel([hsdp[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], 1e-5, "hsdp 2x2 vs none")


def stored_keys(path) -> list[str]:
    """The tensor keys of a safetensors file (its JSON header), without reading the data."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return [k for k in header if k != "__metadata__"]


def test_each_range_is_written_by_exactly_one_rank(hsdp_run):
    ckpt = hsdp_run / "checkpoints" / "step-0000004"
    index = json.loads((ckpt / "index.json").read_text())
    ranges = [(name, kind, start, stop, file) for name, t in index["tensors"].items()
              for kind, k in t["kinds"].items() for start, stop, file, _ in k["ranges"]]
    assert {int(f.split("-")[1]) for *_, f in ranges} == {0, 1}, "only the first replica group's ranks write"
    counts = Counter(r[:4] for r in ranges)
    assert set(counts.values()) == {1}
    stored = Counter()
    for rank in range(4):
        for folder in ("model", "optim"):
            keys = stored_keys(ckpt / folder / f"shard-{rank:05d}-of-00004.safetensors")
            assert bool(keys) == (rank < 2), (rank, folder, len(keys))
            stored.update(keys)
    assert set(stored.values()) == {1} and sum(stored.values()) == len(ranges)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_hsdp_checkpoint_resumes_on_two_ranks(hsdp_run, tmp_path, backend):
    if backend == "zero3":
        pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    torchrun_train(run, f"resume={hsdp_run / 'checkpoints' / 'step-0000004'}", nproc=2, parallelism=backend)
    full, resumed = losses_by_step(hsdp_run), losses_by_step(run)
    assert sorted(resumed) == list(range(5, 9))
    assert_close_rel([resumed[s] for s in range(5, 9)], [full[s] for s in range(5, 9)], 1e-5,
                     f"hsdp 2x2 -> {backend} x2")
