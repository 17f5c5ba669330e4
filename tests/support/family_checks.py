"""The checks tests/e2e/test_families.py runs in the test process on what tests/support/family_worker.py left.

Every (family, backend) row is checked on its own: a check that fails records its error's first
line and the row goes on where it can, so one broken family hides nothing; :func:`table` prints
all rows and the test asserts once.

- ``train``: the job (3 steps) and its resume ran without an error;
- ``step1=HF``: the step-1 loss equals ``from_pretrained(folder)`` plus a forward on the same first
  global batch (rebuilt with fft-dist's data code and loss), within 1e-5 relative;
- ``=none``: steps 1-3 equal those of ``parallelism=none`` within 1e-5 relative (so any two
  backends agree within 2e-5);
- ``resume``: resumed from step 2, step 3's loss and the step-3 checkpoint (weights, optimizer
  states) are bit-identical to the uninterrupted run's;
- ``export logits``: ``export_hf`` of the step-3 checkpoint, loaded with ``from_pretrained``, gives
  the logits of a model built from the checkpoint's own tensors within 1e-6;
- ``export keys``: the export's tensor names and shapes are those ``save_pretrained`` writes for
  that model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CHECKS = ("train", "step1=HF", "=none", "buffers", "resume", "export logits", "export keys")
LOSS_REL = 1e-5
LOGITS_ABS = 1e-6
OK, NOT_REACHED, NOT_APPLICABLE = "ok", "-", "n/a"


def first_line(e: BaseException | str) -> str:
    """The error's first line; with its first detail when that line only introduces a list."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# -- the reference loss: from_pretrained + one forward ---------------------------------------------
def first_batch_loss(folder: Path, overrides: list[str], attn_implementation: str) -> float:
    """The loss of ``from_pretrained(folder)`` on the job's first global batch, as fft-dist defines it
    (token-normalised over the whole global batch), without fft-dist's model or backends."""
    from transformers import AutoModelForCausalLM

    from fft_dist.compose import prepare
    from fft_dist.data import collate
    from fft_dist.data.training import load_training_data
    from fft_dist.loss import objective_for
    from fft_dist.model import load_tokenizer

    prepared = prepare([*overrides, f"model.path={folder}"], world_size=1)
    cfg = prepared.cfg
    tok = load_tokenizer(cfg.model)
    data = load_training_data(cfg.data, tok, cache_dir=cfg.data.cache_dir)
    sampler = data.sampler(prepared.plan.global_batch_size, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    batch = collate(data.train.rows(sampler.global_batch(0)), tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation=attn_implementation).eval()
    objective = objective_for(cfg.data.format)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return float(objective.loss_sum(logits, batch["labels"])) / objective.count(batch)


# -- checkpoints and exports -----------------------------------------------------------------------
def same_state(a: Path, b: Path) -> str | None:
    """None when checkpoints `a` and `b` hold bit-identical tensors of every kind; else the first difference."""
    from fft_dist.checkpoint import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    if sorted(ra.names()) != sorted(rb.names()):
        return f"tensor names differ: {sorted(set(ra.names()) ^ set(rb.names()))[:4]}"
    for name in ra.names():
        if sorted(ra.kinds(name)) != sorted(rb.kinds(name)):
            return f"{name}: kinds {ra.kinds(name)} vs {rb.kinds(name)}"
        for kind in ra.kinds(name):
            x, y = ra.read_full(name, kind), rb.read_full(name, kind)
            if not torch.equal(x, y):
                return f"{name} ({kind}) differs by up to {float((x - y).abs().max()):.3e}"
    return None


def checkpoint_model(checkpoint: Path, attn_implementation: str):
    """The model a checkpoint holds, built from its stored config and its own tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fft_dist import checkpoint as ckpt

    config = dict(ckpt.read_train_state(checkpoint)["model_config"])
    model_type = config.pop("model_type")
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32,
                                             attn_implementation=attn_implementation).eval()
    reader = ckpt.CheckpointReader(checkpoint)
    params = dict(model.named_parameters())
    if set(params) != set(reader.names()):
        raise AssertionError(f"the checkpoint's tensors are not the model's parameters: "
                             f"{sorted(set(params) ^ set(reader.names()))[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(reader.read_full(name))
    return model


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def logits_of(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(2, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# -- one row -----------------------------------------------------------------------------------------
def check_row(run: dict | None, *, reference: float | str, baseline: dict | None, attn_implementation: str,
              work: Path, folder: Path) -> dict:
    """check -> 'ok', an error's first line, '-' (not reached) or 'n/a', for one (family, backend) row;
    plus the measured relative differences under '_step1_rel' and '_none_rel' where they were computed.

    `run`: the worker's record of this family (None: the job never got to it); `reference`: the
    from_pretrained loss (or why it could not be computed); `baseline`: the parallelism=none record
    of this family (None for the none row itself).
    """
    row = dict.fromkeys(CHECKS, NOT_REACHED)
    if baseline is None:
        row["=none"] = NOT_APPLICABLE
    if run is None:
        row["train"] = "not run: the job ended before this family"
        return row
    losses = run.get("losses", {})
    row["train"] = first_line(run["error"]) if run.get("error") else OK
    if "1" in losses:
        if isinstance(reference, str):
            row["step1=HF"] = f"no reference: {reference}"
        else:
            rel = row["_step1_rel"] = _rel(losses["1"], reference)
            row["step1=HF"] = OK if rel <= LOSS_REL else (
                f"step-1 loss {losses['1']!r} vs from_pretrained {reference!r}: rel {rel:.2e} > {LOSS_REL:.0e}")
    if baseline is not None and len(losses) == 3:
        base = baseline.get("losses", {})
        if len(base) != 3:
            row["=none"] = "no reference: parallelism=none did not finish this family"
        else:
            worst = row["_none_rel"] = max(_rel(losses[s], base[s]) for s in ("1", "2", "3"))
            row["=none"] = OK if worst <= LOSS_REL else (
                f"losses {[losses[s] for s in '123']} vs none {[base[s] for s in '123']}: rel {worst:.2e}")
    if run.get("buffers") and Path(run["buffers"]).is_file():
        row["buffers"] = same_buffers(Path(run["buffers"]), folder, attn_implementation)
    if run.get("error"):
        return row
    resumed = run.get("resumed_losses", {})
    if resumed.get("3") != losses.get("3"):
        row["resume"] = f"resumed step-3 loss {resumed.get('3')!r} != uninterrupted {losses.get('3')!r}"
    else:
        row["resume"] = same_state(Path(run["checkpoint"]), Path(run["resumed_checkpoint"])) or OK
    row.update(check_export(Path(run["checkpoint"]), work, attn_implementation))
    return row


def same_buffers(saved: Path, folder: Path, attn_implementation: str) -> str:
    """Every buffer the backend's model held (built on meta under fsdp, and loaded) equals from_pretrained's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    got = load_file(str(saved))
    want = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     attn_implementation=attn_implementation).named_buffers())
    if sorted(got) != sorted(want):
        return f"buffer names differ: only trained {sorted(set(got) - set(want))}, only HF {sorted(set(want) - set(got))}"
    bad = [n for n in want if not torch.equal(got[n].to(want[n].dtype), want[n])]
    return f"buffers differ from from_pretrained's: {bad[:4]}" if bad else OK


def check_export(checkpoint: Path, work: Path, attn_implementation: str) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    from fft_dist import checkpoint as ckpt

    out = {"export logits": NOT_REACHED, "export keys": NOT_REACHED}
    try:
        ckpt.export_hf(checkpoint, work / "hf")
        trained = checkpoint_model(checkpoint, attn_implementation)
        trained.save_pretrained(work / "save_pretrained")
    except Exception as e:  # noqa: BLE001 - reported in the row
        out["export logits"] = first_line(e)
        return out
    exported_shapes, saved_shapes = safetensors_shapes(work / "hf"), safetensors_shapes(work / "save_pretrained")
    if exported_shapes == saved_shapes:
        out["export keys"] = OK
    else:
        only_export = sorted(set(exported_shapes) - set(saved_shapes))
        only_saved = sorted(set(saved_shapes) - set(exported_shapes))
        reshaped = sorted(k for k in set(exported_shapes) & set(saved_shapes) if exported_shapes[k] != saved_shapes[k])
        out["export keys"] = (f"{len(only_export)} names only in the export (e.g. {only_export[:2]}), {len(only_saved)} "
                              f"only in save_pretrained (e.g. {only_saved[:2]}), {len(reshaped)} reshaped")
    try:
        exported = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32,
                                                        attn_implementation=attn_implementation).eval()
        vocab = trained.config.vocab_size
        diff = float((logits_of(exported, vocab) - logits_of(trained, vocab)).abs().max())
        out["export logits"] = OK if diff <= LOGITS_ABS else f"logits differ by up to {diff:.3e} > {LOGITS_ABS:.0e}"
    except Exception as e:  # noqa: BLE001
        out["export logits"] = first_line(e)
    return out


# -- the report ----------------------------------------------------------------------------------------
def table(backend: str, rows: dict[str, dict], seconds: float) -> str:
    """A grid (family x check: ok / FAIL n / - / n/a) for one backend, then each failure's first line."""
    width = max(len(n) for n in rows) + 2
    lines = [f"parallelism={backend}: {len(rows)} families in one job, {seconds:.1f} s",
             "family".ljust(width) + "".join(c.ljust(15) for c in CHECKS)]
    notes = []
    for name, row in rows.items():
        cells = []
        for check in CHECKS:
            value = row[check]
            if value in (OK, NOT_REACHED, NOT_APPLICABLE):
                cells.append(value.ljust(15))
            else:
                notes.append(f"  [{len(notes) + 1}] {name} / {backend} / {check}: {value}")
                cells.append(f"FAIL [{len(notes)}]".ljust(15))
        lines.append(name.ljust(width) + "".join(cells))
    measured = [f"worst {label}: {max(values):.1e} relative" for label, key in
                (("step1=HF", "_step1_rel"), ("=none", "_none_rel"))
                if (values := [row[key] for row in rows.values() if key in row])]
    return "\n".join(lines + ([", ".join(measured)] if measured else []) + ([""] + notes if notes else []))


def failed(rows: dict[str, dict]) -> list[str]:
    return [f"{name}/{check}" for name, row in rows.items() for check in CHECKS
            if row[check] not in (OK, NOT_REACHED, NOT_APPLICABLE)]


def read_worker_output(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"families": {}}
