"""Every checkpoint metadata file is parsed by one typed spec (issue #15, items 8-12).

A fuzz walk mutates every field of real files (wrong type, sign, huge, missing, extra) and every
reader must refuse with a CheckpointError naming the file and the field, unless the mutation is
valid by the documented schema (the short, explicit VALID lists below). Then the regressions
the break-it run found, one test each. Single process, a few seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from checkpoint_worker import llama_shapes

import pytest

from checkpoint_helpers import RUN, TINY_LLAMA, edit_json, rewrite, save, strategy
from helpers import REPO
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointError
from fft_dist.train_state import TRAINER_STATE_SPEC, parse_trainer_state


TOKENIZER = REPO / "fft_dist" / "assets" / "tokenizer"


RUN_ID = "0123456789abcdef0123"


# train_state of real 2-step runs (tiny llama, 2 ranks): `fft-dist train ... train.max_steps=2
# eval.every_steps=1 checkpoint.save_final=true`, with the default data and with data=stdlib_mixture.
TRAINER = {"tokens_seen": 471, "skipped_steps": 0, "best_checkpoint": "step-0000002",
           "best_eval_loss": 7.5075190662202385, "best_step": 2, "evals_without_improvement": 0,
           "last_eval_loss": 7.5075190662202385, "first_eval_loss": 7.6375694056919645, "last_eval_step": 2,
           "stopped_early": False}


SCHEDULE = {"total_steps": 2, "warmup_steps": 0}


SINGLE = {"trainer": TRAINER, "schedule": SCHEDULE,
          "sampler": {"epoch": 0, "batch_in_epoch": 2, "sample_in_epoch": 8, "steps_per_epoch": 34, "seed": 1234,
                      "global_batch_size": 4, "num_examples": 138}}


MIXTURE = {"trainer": dict(TRAINER, tokens_seen=493), "schedule": SCHEDULE,
           "sampler": {"samples": 8, "samples_per_epoch": 154, "seed": 1234, "global_batch_size": 4,
                       "num_examples": 394,
                       "sources": {"docstrings": {"samples": 7, "epoch": 0, "num_examples": 138},
                                   "text": {"samples": 1, "epoch": 0, "num_examples": 256}}}}


def real_checkpoint(root: Path, *, tokenizer: bool = True, **meta) -> Path:
    """A tiny Llama checkpoint with what Trainer._save passes (meta, config, the trainer's dict)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**TINY_LLAMA)
    full = {"config_yaml": "model:\n  name: tiny\n", "model_config": cfg.to_dict(), "backend": "fsdp",
            "model_path": "/models/base", "optimizer": "adamw", "task": "causal_lm",
            "tokenizer_dir": str(TOKENIZER) if tokenizer else None, "generation_config": {"bos_token_id": 1}}
    full.update(meta)
    return ckpt.save_checkpoint(strategy(llama_shapes(cfg), steps=1), ckpt_root=root, step=2, train_state=SINGLE,
                                keep_last=2, meta=full, run_id=RUN)


@functools.lru_cache(maxsize=1)
def llama_strategy():
    """One strategy, built once and loaded into again and again (building one costs more than a load)."""
    from transformers import LlamaConfig

    return strategy(llama_shapes(LlamaConfig(**TINY_LLAMA)), steps=0)


# -- the fuzz walk ---------------------------------------------------------------------------------------
MAPS = {"files", "tensors", "sources"}  # free-keyed objects: their first entry stands for all


OPAQUE = {("train_state",), ("model_config",), ("meta", "generation_config")}  # checked by their owners


DELETE, ADD = object(), object()


def value_mutations(v):
    if isinstance(v, bool):
        return [("type", 1)]
    if isinstance(v, int):
        return [("type", str(v)), ("bool", True), ("sign", -v if v else -1), ("huge", 10**30), ("huge-float", 1e30)]
    if isinstance(v, float):
        return [("type", str(v)), ("sign", -v if v else -1.0), ("huge", 1e30)]
    if isinstance(v, str):
        return [("type", 12345)]
    if isinstance(v, list):
        big = v[0] if v and not isinstance(v[0], (dict, list)) else 0
        return [("type", "x"), ("huge", [big] * 10_000)]
    if isinstance(v, dict):
        return [("type", [])]
    return [("type", [1])]  # null


def mutations(doc) -> list[tuple[tuple, str, object]]:
    """(path, label, new value | DELETE | ADD) for every field of `doc` (long lists: first and last item)."""
    out: list[tuple[tuple, str, object]] = []

    def visit(value, path):
        if path:
            out.extend((path, label, new) for label, new in value_mutations(value))
        if path in OPAQUE:
            return
        if isinstance(value, dict):
            out.append((path + ("bogus_field",), "extra", ADD))
            keys = list(value)[:1] if path and path[-1] in MAPS else list(value)
            for k in keys:
                out.append((path + (k,), "missing", DELETE))
                visit(value[k], path + (k,))
        elif isinstance(value, list) and value:
            out.append((path + (len(value),), "extra", ADD))
            for i in sorted({0, len(value) - 1}):
                out.append((path + (i,), "missing", DELETE))
                visit(value[i], path + (i,))

    visit(doc, ())
    return out


def apply(doc, path: tuple, new):
    doc = copy.deepcopy(doc)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if new is DELETE:
        del parent[last]
    elif new is ADD and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[-1]))
    elif new is ADD:
        parent[last] = 1
    else:
        parent[last] = new
    return doc


def generic(path: tuple) -> str:
    """The path with the free keys (a tensor name, a file name, a source name) written as *."""
    return ".".join("*" if i and path[i - 1] in MAPS else str(p) for i, p in enumerate(path))


def names_in(path: tuple) -> list[str]:
    return [p for p in path if isinstance(p, str)][-2:]


# Mutations the documented schema accepts: (file, generic path, label). Everything else is refused.
VALID = {
    ("MANIFEST.json", "run_id", "missing"), ("train_state.json", "run_id", "missing"),
    *(("train_state.json", f"meta.{k}", "missing")
      for k in ("model_path", "optimizer", "task", "generation_config")),  # tokenizer_dir: copied, not stored
    ("train_state.json", "rng.0.numpy.cached_gaussian", "sign"), ("train_state.json", "rng.0.numpy.cached_gaussian",
                                                                    "huge"),
    *(("index.json", f"tensors.*.kinds.{k}", "missing") for k in ("exp_avg", "exp_avg_sq", "step")),
    ("index.json", "tensors.*.kinds.step.shape.1", "extra"),  # [1] -> [1, 1]: one element all the same
    ("index.json", "tensors.*.kinds.step.shape.0", "missing"),  # [1] -> []: a scalar, one element
}


# Refused by verify (the shards' headers hold the tensor), load (the model has it) and export (it
# verifies), not by the cheap check behind find_resume, nor by checkpoint_info: they open no shard.
DEEP = {("index.json", "tensors.*", "missing")}


def readers(folder: Path, out: Path):
    return {"find_resume": lambda: ckpt.find_resume(str(folder), folder.parent),
            "load_checkpoint": lambda: ckpt.load_checkpoint(llama_strategy(), folder),
            "checkpoint_info": lambda: ckpt.checkpoint_info(folder),
            "export_hf": lambda: ckpt.export_hf(folder, out, overwrite=True)}


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> Path:
    folder = real_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpts", tokenizer=False)  # less to hash
    edit_json(folder, "train_state.json", lambda s: s.update(run_id=RUN_ID))
    edit_json(folder, "MANIFEST.json", lambda m: m.update(run_id=RUN_ID), fix_manifest=False)
    assert ckpt.verify_checkpoint(folder) == []
    return folder


@pytest.mark.parametrize("rel", ["MANIFEST.json", "index.json", "train_state.json"])
def test_fuzz_every_field_of_each_metadata_file(fuzz_folder, tmp_path, rel):
    folder = fuzz_folder
    original = {f: (folder / f).read_bytes() for f in ("MANIFEST.json", rel)}
    doc = json.loads(original[rel])
    cases = mutations(doc)
    assert len(cases) > 30
    seen_valid, failures = set(), []
    try:
        for path, label, new in cases:
            what = f"{rel} {generic(path)} {label}"
            rewrite(folder, rel, json.dumps(apply(doc, path, new)), fix_manifest=rel != "MANIFEST.json")
            problems = ckpt.verify_checkpoint(folder)
            valid = (rel, generic(path), label) in VALID
            if valid:
                seen_valid.add((rel, generic(path), label))
                if problems:
                    failures.append(f"{what}: documented as valid, refused: {problems}")
            elif not problems or rel not in problems[0] or not any(n in problems[0] for n in names_in(path)):
                failures.append(f"{what}: expected a problem naming {rel} and {names_in(path)}, got {problems}")
            deep = (rel, generic(path), label) in DEEP
            for name, call in readers(folder, tmp_path / "hf").items():
                try:
                    call()
                except CheckpointError:
                    continue
                except Exception as e:  # noqa: BLE001 - the point of the test
                    failures.append(f"{what}: {name} raised {type(e).__name__}: {e}")
                    continue
                if not valid and not (deep and name in ("find_resume", "checkpoint_info")):
                    failures.append(f"{what}: {name} accepted it")
            for f, data in original.items():
                (folder / f).write_bytes(data)
    finally:
        for f, data in original.items():
            (folder / f).write_bytes(data)
    assert not failures, f"{len(failures)} of {len(cases)} mutations:\n  " + "\n  ".join(failures[:20])
    assert seen_valid == {v for v in VALID if v[0] == rel}  # the VALID list names only real cases


VALID_TRAINER = {
    *((f"trainer.{k}", m) for k in ("best_eval_loss", "last_eval_loss", "first_eval_loss") for m in ("sign", "huge")),
    ("sampler.seed", "sign"),  # train.seed may be any 64-bit integer
}


@pytest.mark.parametrize("saved", [SINGLE, MIXTURE], ids=["single-source", "mixture"])
def test_fuzz_the_trainer_sections(saved):
    assert parse_trainer_state(copy.deepcopy(saved), "train_state.json") == saved
    failures = []
    for path, label, new in mutations(saved):
        what = (generic(path), label)
        try:
            parse_trainer_state(apply(saved, path, new), "x/train_state.json")
        except CheckpointError as e:
            if what in VALID_TRAINER or not str(e).startswith("x/train_state.json: field train_state.") \
                    or not any(n in str(e) for n in names_in(path)):
                failures.append(f"{what}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            failures.append(f"{what}: {type(e).__name__}: {e}")
            continue
        if what not in VALID_TRAINER:
            failures.append(f"{what}: accepted")
    assert not failures, "\n  ".join(failures[:20])


def test_trainer_spec_names_every_train_state_field():
    from fft_dist.trainer import TrainState

    fields = {f.name for f in dataclasses.fields(TrainState)} - {"step"}
    assert set(TRAINER_STATE_SPEC.required["trainer"].specs) == fields  # required + optional (eval.sets: newer)


def test_nan_eval_loss_is_accepted_as_json_writes_it():
    """An eval split with no loss tokens gives NaN (evaluation.split_loss); its checkpoint stays resumable."""
    saved = json.loads(json.dumps(dict(SINGLE, trainer=dict(TRAINER, best_eval_loss=float("nan"),
                                                            last_eval_loss=float("inf")))))
    parsed = parse_trainer_state(saved, "train_state.json")
    assert math.isnan(parsed["trainer"]["best_eval_loss"]) and parsed["trainer"]["last_eval_loss"] == math.inf


# -- the regressions of issue #15 items 8-12 --------------------------------------------------------------
def refused_everywhere(folder: Path, *needles: str) -> None:
    problems = ckpt.verify_checkpoint(folder)
    assert problems and all(n in problems[0] for n in needles), problems
    for name, call in readers(folder, folder.parent / "hf").items():
        with pytest.raises(CheckpointError) as e:
            call()
        assert all(n in str(e.value) for n in needles), (name, str(e.value))
    assert not (folder.parent / "hf").exists()


@pytest.mark.parametrize("step", [-5, 1e30, 10**30, "3", True])
def test_item8_10_step_out_of_range_is_refused(tmp_path, step):
    folder = real_checkpoint(tmp_path / "ckpts")
    edit_json(folder, "train_state.json", lambda s: s.update(step=step))
    refused_everywhere(folder, "train_state.json", "field step")
    with pytest.raises(CheckpointError, match="field step"):  # resume=auto: nothing intact, refused
        ckpt.find_resume("auto", folder.parent)


@pytest.mark.parametrize("rel,mutate,field", [
    ("train_state.json", lambda s: s.update(rng=[]), "field rng"),
    ("train_state.json", lambda s: s["meta"].update(secret_dir="/etc"), "field meta.secret_dir"),
    ("train_state.json", lambda s: s.update(run_id="NOT-HEX"), "field run_id"),
    ("index.json", lambda i: i.update(shape=[13, 8]), "field shape"),
    ("index.json", lambda i: i.update(tensors={n: dict(t, kinds={}) for n, t in i["tensors"].items()}), "kinds"),
    ("index.json", lambda i: i.update(tensors={n: dict(t, kinds={k: v for k, v in t["kinds"].items() if k != "param"})
                                               for n, t in i["tensors"].items()}), "'param'"),
    ("index.json", lambda i: i.update(tensors={}), "field tensors"),
    ("MANIFEST.json", lambda m: m.update(world_size=0), "field world_size"),
])
def test_item9_malformed_metadata_is_refused(tmp_path, rel, mutate, field):
    """What the break-it run found accepted: an index whose tensors store no kinds (export wrote 0
    tensors), ``rng: []`` (RNG silently not restored), unknown extra fields."""
    folder = real_checkpoint(tmp_path / "ckpts")
    edit_json(folder, rel, mutate, fix_manifest=rel != "MANIFEST.json")
    refused_everywhere(folder, rel, field)


@pytest.mark.parametrize("mutate,field", [
    (lambda t: t["schedule"].update(total_steps="x"), "train_state.schedule.total_steps"),
    (lambda t: t.update(sampler="garbage"), "train_state.sampler"),
    (lambda t: t["trainer"].update(tokens_seen=-1), "train_state.trainer.tokens_seen"),
    (lambda t: t["trainer"].update(stopped_early=1), "train_state.trainer.stopped_early"),
    (lambda t: t["sampler"].update(epoch=1e30), "train_state.sampler.epoch"),
    (lambda t: t["trainer"].update(best_checkpoint="../../etc"), "train_state.trainer.best_checkpoint"),
])
def test_item9_10_malformed_trainer_sections_are_refused(mutate, field):
    saved = copy.deepcopy(SINGLE)
    mutate(saved)
    with pytest.raises(CheckpointError, match=f"ckpt/train_state.json: field {field}: expected"):
        parse_trainer_state(saved, "ckpt/train_state.json")


def test_newer_format_version_asks_for_an_upgrade(tmp_path):
    for rel in ("MANIFEST.json", "index.json", "train_state.json"):
        folder = real_checkpoint(tmp_path / rel)
        edit_json(folder, rel, lambda d: d.update(format_version=2), fix_manifest=rel != "MANIFEST.json")
        refused_everywhere(folder, rel, "field format_version", "upgrade fft-dist")


def test_run_id_is_optional_and_accepted(tmp_path):
    folder = real_checkpoint(tmp_path / "ckpts")
    assert ckpt.verify_checkpoint(folder) == []  # written without one, as old checkpoints are
    edit_json(folder, "train_state.json", lambda s: s.update(run_id="a" * 64))
    edit_json(folder, "MANIFEST.json", lambda m: m.update(run_id="0" * 12), fix_manifest=False)
    assert ckpt.verify_checkpoint(folder) == []


def test_item11_export_never_reads_paths_from_the_metadata(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text('{"SECRET": "outside tokenizer"}')
    (outside / "generation_config.json").write_text('{"SECRET_FIELD": 7}')
    folder = real_checkpoint(tmp_path / "ckpts", tokenizer=False, generation_config=None)
    assert not (folder / "tokenizer").exists()
    edit_json(folder, "train_state.json", lambda s: s["meta"].update(tokenizer_dir=str(outside),
                                                                     model_path=str(outside)))
    summary = ckpt.export_hf(folder, tmp_path / "hf")
    assert summary["tokenizer_files"] == [] and not (tmp_path / "hf" / "tokenizer.json").exists()
    assert "SECRET_FIELD" not in (tmp_path / "hf" / "generation_config.json").read_text()  # derived from config
    # an explicit tokenizer_dir is the caller's choice: used
    summary = ckpt.export_hf(folder, tmp_path / "hf2", tokenizer_dir=TOKENIZER)
    assert "tokenizer.json" in summary["tokenizer_files"]


def test_export_uses_the_checkpoints_own_files_only(tmp_path):
    folder = real_checkpoint(tmp_path / "ckpts", generation_config={"bos_token_id": 1, "temperature": 0.6})
    summary = ckpt.export_hf(folder, tmp_path / "hf")
    assert "tokenizer.json" in summary["tokenizer_files"]  # the checkpoint's own, verified copy
    # the stored generation config, as it was (transformers would refuse to re-save this one)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                   "temperature": 0.6}
    # a tokenizer file swapped for a link to the same bytes elsewhere passes the sha256, but is not copied
    link = folder / "tokenizer" / "tokenizer.json"
    (tmp_path / "elsewhere.json").write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere.json")
    summary = ckpt.export_hf(folder, tmp_path / "hf", overwrite=True)
    assert "tokenizer.json" not in summary["tokenizer_files"] and summary["tokenizer_files"]


@pytest.fixture
def root_with_secret(tmp_path) -> tuple[Path, str]:
    root = tmp_path / "ckpts"
    save(root, 1)
    save(root, 2)
    secret = "TOPSECRET-hunter2-password"
    (tmp_path / "secret.txt").write_text(secret + "\n")
    return root, secret


def test_item12_latest_symlink_is_refused_unread(root_with_secret, capsys):
    root, secret = root_with_secret
    latest = root / "latest"
    latest.unlink()
    latest.symlink_to(root.parent / "secret.txt")
    messages = []
    for call in (lambda: ckpt.resolve_checkpoint(latest), lambda: ckpt.resolve_checkpoint(root),
                 lambda: ckpt.find_resume(str(latest), root), lambda: ckpt.checkpoint_info(root)):
        with pytest.raises(CheckpointError) as e:
            call()
        messages.append(str(e.value))
    messages += ckpt.verify_checkpoint(root) + ckpt.verify_checkpoint(latest)
    assert ckpt.find_resume("auto", root) == root / "step-0000002"  # falls back, with a warning
    messages.append(capsys.readouterr().err)
    assert all("symbolic link" in m for m in messages), messages
    assert not any(secret[:8] in m for m in messages), messages
    # a link is refused even when it points at a valid name
    (root.parent / "name.txt").write_text("step-0000001\n")
    latest.unlink()
    latest.symlink_to(root.parent / "name.txt")
    with pytest.raises(CheckpointError, match="symbolic link"):
        ckpt.resolve_checkpoint(root)


def test_item12_garbage_latest_reports_its_size_not_its_content(root_with_secret, capsys):
    root, secret = root_with_secret
    (root / "latest").write_text(secret)
    with pytest.raises(CheckpointError) as e:
        ckpt.resolve_checkpoint(root / "latest")
    assert f"holds {len(secret)} bytes" in str(e.value) and secret[:8] not in str(e.value)
    assert ckpt.find_resume("auto", root) == root / "step-0000002"
    assert secret[:8] not in capsys.readouterr().err
    (root / "latest").unlink()
    (root / "latest").mkdir()  # not a regular file
    with pytest.raises(CheckpointError, match="not a regular file"):
        ckpt.resolve_checkpoint(root)
    (root / "latest").rmdir()
    os.mkfifo(root / "latest")  # a FIFO would block a reader forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        ckpt.resolve_checkpoint(root)


@pytest.mark.parametrize("rel,text", [
    ("index.json", "[" * 100_000 + "]" * 100_000),  # deeper than Python's recursion limit
    ("train_state.json", '{"step": ' + "9" * 5000 + "}"),  # more digits than int() converts
    ("MANIFEST.json", '{"format": "fft-dist-checkpoint", "format_version": NaN}'),
])
def test_json_python_cannot_read_is_a_named_error(tmp_path, rel, text):
    folder = save(tmp_path / "ckpts", 1)
    rewrite(folder, rel, text, fix_manifest=rel != "MANIFEST.json")
    refused_everywhere(folder, rel)
