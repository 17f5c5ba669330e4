"""One device-to-host sync per optimizer step, whatever the accumulation (issue #17): a GPU must never
wait for the host in the middle of a step.

On CPU there is no device to wait for, so the test counts what would be a sync on a GPU: every read
of a floating-point tensor's value on the host (``.item()``, ``.tolist()``, ``float()``, ``.cpu()``
...) made by fft-dist's or the model's code inside a training step, through a TorchFunctionMode, which
sees those calls on any device. The loss, the router's aux loss and the gradient norm are floating
point; the data's token counts are integers read before any compute, and are not counted. Reads inside
torch.optim are not counted either: a non-capturable optimizer keeps its ``step`` counter on the host
by design, so reading it is no device sync.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import TINY_JOB, REPO

OURS = (str(REPO / "fft_dist"), "/transformers/")
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}


class FloatHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and tensor.is_floating_point() and func in HOST_READS:
            caller = sys._getframe(1).f_code.co_filename
            if any(part in caller for part in OURS):
                self.reads.append(f"{func.__name__} in {Path(caller).name}")
        return func(*args, **kwargs)


@pytest.fixture
def trainer_for(tmp_path_factory):
    """Function-scoped, so the autouse fixture that restores os.environ sees it start and end: the
    one-process group sets RANK, WORLD_SIZE and MASTER_*, which must not outlive this test."""
    from fft_dist.compose import prepare
    from fft_dist.dist import destroy, init_distributed
    from fft_dist.trainer import Trainer

    ctx = init_distributed("gloo", 120)

    def make(global_batch: int) -> Trainer:
        run = tmp_path_factory.mktemp("run")
        prepared = prepare([*TINY_JOB, f"run.dir={run}", "parallelism=none", "launcher.nproc_per_node=1",
                            f"train.global_batch_size={global_batch}", "train.micro_batch_size=1",
                            "checkpoint.save_final=false"], world_size=1)
        trainer = Trainer(prepared.cfg, ctx=ctx, plan=prepared.plan, config_yaml=prepared.yaml)
        trainer._build()
        return trainer

    yield make
    destroy()


def test_a_step_reads_the_device_once_whatever_the_accumulation(trainer_for):
    counts = {}
    for accumulation in (1, 8):
        trainer = trainer_for(accumulation)
        assert trainer.plan.grad_accum == accumulation
        trainer.train_step(0)  # warm-up (lazy initialisation may read values once)
        with FloatHostReads() as mode:
            trainer.train_step(1)
        counts[accumulation] = mode.reads
    assert counts[1] == counts[8], f"host reads per step: accumulation 1 {counts[1]}, accumulation 8 {counts[8]}"
    assert len(counts[1]) <= 1, counts[1]
