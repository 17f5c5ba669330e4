"""Rank-side driver of tests/e2e/test_families.py: many model families inside ONE launched job.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/family_worker.py --spec S --out O
    python tests/support/family_worker.py --spec S --out O          # parallelism=none: one process, no torchrun

The start-up of a rank (imports: 6-8 s on 2 shared cores) is paid once per job, not per family.
SPEC is a JSON file: ``{"overrides": [...common to every run...], "families": [{"name", "folder",
"root", "overrides": [...]}, ...]}``. For each family, every rank:

1. composes the config with :func:`fft_dist.compose.prepare` (``model.path=<folder>``,
   ``run.dir=<root>/run``), rank 0 claims run.dir as ``fft-dist train`` does, and the real
   :class:`fft_dist.trainer.Trainer` runs the job (the spec's overrides: 3 steps, a checkpoint every step);
2. a fresh Trainer in ``<root>/resume`` resumes from the first run's step-2 checkpoint and runs step 3 again.

Rank 0 rewrites OUT (JSON) after each family: ``{name: {"losses", "resumed_losses", "checkpoint",
"resumed_checkpoint", "buffers", "seconds", "error", "detail"}}`` ("buffers": a safetensors file of the
first run's model buffers as the backend held them); "error" (the exception) and "detail" (the
traceback's tail) are set when a run raised. A family that fails does not stop the others, as long as the
ranks agree that it failed (fft-dist's own errors are agreed across ranks); if they do not, the job
stops there and says so, since the process group can no longer be trusted.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tests/support/family_worker.py")
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout-s", type=int, default=300, help="collective timeout of the process group")
    return p.parse_args(argv)


def _losses(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["step"]): r["loss"] for r in records if "loss" in r}


def _train(overrides: list[str], ctx, buffers_to: Path | None = None):
    """One fft-dist job in this process group, as fft_dist.rank runs it after launch."""
    from fft_dist.compose import prepare
    from fft_dist.dist import barrier
    from fft_dist.rank import claim_run_dir
    from fft_dist.trainer import Trainer

    prepared = claim_run_dir(prepare(overrides, world_size=ctx.world_size), ctx)
    trainer = Trainer(prepared.cfg, ctx=ctx, plan=prepared.plan, config_yaml=prepared.yaml)
    try:
        summary = trainer.run()
    except BaseException:
        trainer.metrics.close()
        raise
    if buffers_to is not None and ctx.is_main:
        save_buffers(trainer.strategy.model, buffers_to)
    barrier()
    return summary


def save_buffers(model, path: Path) -> None:
    """Every buffer of the trained model as the backend holds it (buffers are never sharded)."""
    from safetensors.torch import save_file

    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    save_file({n: b.detach().cpu().contiguous() for n, b in module.named_buffers()}, str(path))


def _run_family(fam: dict, common: list[str], ctx) -> dict:
    root = Path(fam["root"])
    first = [*common, f"model.path={fam['folder']}", *fam["overrides"]]
    result: dict = {"losses": {}, "resumed_losses": {}, "checkpoint": None, "resumed_checkpoint": None}
    t0 = time.perf_counter()
    try:
        summary = _train([*first, f"run.dir={root / 'run'}"], ctx, buffers_to=root / "buffers.safetensors")
        result["buffers"] = str(root / "buffers.safetensors")
        result["checkpoint"] = summary.checkpoint
        result["losses"] = _losses(root / "run")
        result["seconds_run"] = round(time.perf_counter() - t0, 2)
        step2 = root / "run" / "checkpoints" / "step-0000002"
        summary = _train([*first, f"run.dir={root / 'resume'}", f"resume={step2}"], ctx)
        result["resumed_checkpoint"] = summary.checkpoint
        result["resumed_losses"] = _losses(root / "resume")
    except Exception as e:  # noqa: BLE001 - reported per family; the test prints the table
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["detail"] = "".join(traceback.format_exception(e))[-4000:]
        result["losses"] = result["losses"] or _losses(root / "run")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def import_model_classes(folders: list[str]) -> None:
    """Import each folder's transformers model class now, before any ``zero.Init`` builds one.

    Needed because this job builds many models in one process (a real rank builds one).
    DeepSpeed 0.19.8's ``zero.Init`` replaces ``Module.__init_subclass__`` while it is active
    (runtime/zero/partition_parameters.py:581-596), so a modeling module that transformers imports
    lazily inside it gets its classes' ``__init__`` recorded as ``_old_init`` before class decorators
    run; on exit (:620-622) that ``_old_init`` is put back. ``kernels``' ``use_kernelized_func``
    (kernels 0.19.1, _internals/layer/layer.py), which decorates e.g. LlamaAttention, wraps
    ``__init__`` to give each instance ``_kernel_funcs``: that wrapper is dropped, and every later
    instance fails its first forward with "AttributeError: 'LlamaAttention' object has no attribute
    '_kernel_funcs'". Imported outside ``zero.Init``, the classes keep their decorators.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for folder in folders:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder, local_files_only=True))]


def main(argv: list[str] | None = None) -> int:
    from fft_dist.dist import all_gather_small, barrier, destroy, init_distributed

    args = _parse(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args.spec).read_text())
    import_model_classes([fam["folder"] for fam in spec["families"]])
    ctx = init_distributed("gloo", args.timeout_s)
    out: dict = {"world_size": ctx.world_size, "families": {}}
    code = 0
    for fam in spec["families"]:
        result = _run_family(fam, spec["overrides"], ctx)
        errors = all_gather_small(result.get("error"))
        failed = [r for r, error in enumerate(errors) if error is not None]
        if failed and len(failed) < len(errors):  # a rank failed alone: its peer may be stuck in a collective
            result["error"] = f"only rank(s) {failed} failed: {errors[failed[0]]}"
            out["aborted_after"] = fam["name"]
            code = 1
        out["families"][fam["name"]] = result
        if ctx.is_main:
            Path(args.out).write_text(json.dumps(out, indent=1))
        if code:
            break
        gc.collect()  # the family's model, optimizer and engine go before the next one is built
    barrier()
    destroy()
    return code


if __name__ == "__main__":
    from fft_dist.dist import exit_rank

    exit_rank(main())  # skip finalisation: torch 2.13's gloo can abort there (see exit_rank)
