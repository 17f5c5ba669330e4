"""fft-dist deletes, moves or overwrites only what it made (issue #15 items 1-5, and the property test).

Fast, single-process: checkpoints of the test strategy (tests/support/checkpoint_worker.py), the run-dir
claim with a typed config, and the export. The real multi-rank paths are in test_launch.py,
test_checkpoint.py and test_checkpoint_e2e.py.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from checkpoint_helpers import RUN, llama_checkpoint, save, strategy

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointError, ownership
from fft_dist.config import ConfigError, FFTConfig
from fft_dist.rundir import RUN_MARKER, claim, prepare_run_dir, read_run_id

OTHER = "aaaaaaaaaaaaaaaa"  # another run's id


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` with its content (files), link target (links) or '<dir>'."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = p.read_bytes()
    return out


def config(tmp_path: Path, **checkpoint) -> FFTConfig:
    cfg = FFTConfig()
    cfg.run.dir = str(tmp_path / "run")
    cfg.checkpoint.dir = str(tmp_path / "run" / "checkpoints")
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


# -- 1. a save and its pruning touch only this run's own temporaries ------------------------------------------
def test_saves_and_pruning_leave_a_users_tmp_folders_alone(tmp_path):
    root = tmp_path / "ck"
    (root / "mydata.tmp").mkdir(parents=True)
    (root / "mydata.tmp" / "notes.txt").write_text("mine")
    (root / "step-0000001.tmp").mkdir()  # a user's folder with the old temporary name: not ours either
    (root / "latest.tmp").write_text("step-0000009\n")
    killed = root / ownership.temp_name("step-0000007", RUN)  # a killed save of this run: cleaned up
    killed.mkdir()
    other = root / ownership.temp_name("step-0000007", OTHER)  # another run's: left alone
    other.mkdir()
    for step in (1, 2, 3):
        save(root, step, keep_last=1)
    assert (root / "mydata.tmp" / "notes.txt").read_text() == "mine"
    assert (root / "step-0000001.tmp").is_dir() and (root / "latest.tmp").read_text() == "step-0000009\n"
    assert not killed.exists() and other.is_dir()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".fft-dist.lock"] * 0 + ["latest", "latest.tmp", "mydata.tmp", "step-0000001.tmp", "step-0000003", other.name])


def test_keep_last_prunes_only_this_runs_checkpoints(tmp_path):
    root = tmp_path / "ck"
    copied = save(root, 1, run_id=OTHER)  # e.g. another run's checkpoint copied in to resume from
    for step in (2, 3, 4):
        save(root, step, keep_last=1)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-0000001", "step-0000004"]
    assert ckpt.verify_checkpoint(copied) == []


def test_a_symlink_named_like_a_checkpoint_is_never_read_or_pruned(tmp_path):
    root = tmp_path / "ck"
    elsewhere = save(tmp_path / "elsewhere", 9)  # an intact checkpoint, but not of this root
    root.mkdir()
    (root / "step-0000009").symlink_to(elsewhere)
    for step in (1, 2):
        save(root, step, keep_last=1)
    assert (root / "step-0000009").is_symlink() and ckpt.verify_checkpoint(elsewhere) == []
    assert ckpt.find_resume("auto", root) == root / "step-0000002"


def test_a_committed_step_is_never_saved_over(tmp_path):
    root = tmp_path / "ck"
    first = save(root, 2)
    before = tree(first)
    with pytest.raises(CheckpointError, match="never saves over a committed checkpoint"):
        save(root, 2, s=strategy(steps=3))
    assert tree(first) == before
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]


# -- 2 and 3. a fresh run: refused over an earlier run; overwrite deletes only fft-dist's own things ---------------
def earlier_run(tmp_path: Path) -> FFTConfig:
    """run.dir as an earlier run left it, with a user's files beside it."""
    cfg = config(tmp_path)
    run, root = Path(cfg.run.dir), Path(cfg.checkpoint.dir)
    save(root, 1, run_id=OTHER)
    save(root, 2, run_id=OTHER)
    (root / "step-plan.md").write_text("my plan")
    (root / "step-by-step").mkdir()
    (root / "step-by-step" / "a.txt").write_text("keep")
    (run / RUN_MARKER).write_text(json.dumps({"run_id": OTHER}))
    (run / "config.yaml").write_text("old: config\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "hf").mkdir()
    (run / "hf" / "model.safetensors").write_bytes(b"weights")
    ownership.write_export_marker(run / "hf", run_id=OTHER, step=2)
    (run / "notes.md").write_text("mine")
    return cfg


def test_fresh_run_refuses_an_earlier_runs_outputs_and_names_them(tmp_path):
    cfg = earlier_run(tmp_path)
    run = Path(cfg.run.dir)
    before = tree(run)
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(cfg, "new: config\n")
    msg = str(e.value)
    assert "checkpoint.overwrite=true" in msg and "resume=auto" in msg and "step-0000002" in msg
    assert "step-plan.md" not in msg and "step-by-step" not in msg  # not called checkpoints of another run
    assert {k: v for k, v in tree(run).items() if ".fft-dist.lock" not in k} == before


def test_outputs_alone_are_refused_too(tmp_path):
    """Item 3: the old checkpoints are gone (kept elsewhere), its hf/ and metrics are not."""
    cfg = earlier_run(tmp_path)
    shutil.rmtree(cfg.checkpoint.dir)
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        prepare_run_dir(cfg, "new: config\n")
    assert (Path(cfg.run.dir) / "hf" / "model.safetensors").read_bytes() == b"weights"


def test_overwrite_deletes_only_what_fft_dist_made(tmp_path):
    cfg = earlier_run(tmp_path)
    cfg.checkpoint.overwrite = True
    run, root = Path(cfg.run.dir), Path(cfg.checkpoint.dir)
    prepare_run_dir(cfg, "new: config\n")
    left = tree(run)
    assert left["checkpoints/step-plan.md"] == b"my plan" and left["checkpoints/step-by-step/a.txt"] == b"keep"
    assert left["notes.md"] == b"mine" and left["config.yaml"] == b"new: config\n"
    assert not (run / "hf").exists() and not (run / "metrics.jsonl").exists()
    assert not [p for p in root.iterdir() if p.name.startswith("step-0") or p.name == "latest"]
    assert read_run_id(run) not in (None, OTHER)


def test_overwrite_refuses_what_it_cannot_prove_it_made(tmp_path):
    cfg = config(tmp_path, overwrite=True)
    damaged = Path(cfg.checkpoint.dir) / "step-0000005"
    damaged.mkdir(parents=True)
    (damaged / "data.bin").write_bytes(b"x")  # no manifest: maybe a user's, maybe a wreck
    with pytest.raises(ConfigError, match="step-0000005"):
        prepare_run_dir(cfg, "new: config\n")
    assert (damaged / "data.bin").read_bytes() == b"x"


def test_a_job_that_never_trained_can_be_rerun(tmp_path):
    """A run.dir holding only the marker and config.yaml (the job stopped before step 1) is reused."""
    cfg = config(tmp_path)
    prepare_run_dir(cfg, "first\n")
    first = read_run_id(Path(cfg.run.dir))
    claim(cfg, Path(cfg.run.dir))
    assert read_run_id(Path(cfg.run.dir)) != first


def test_resume_keeps_the_run_id(tmp_path):
    cfg = config(tmp_path)
    prepare_run_dir(cfg, "first\n")
    first = read_run_id(Path(cfg.run.dir))
    cfg.resume = "auto"
    assert claim(cfg, Path(cfg.run.dir)) == first


# -- 5. resume=auto takes the newest intact checkpoint; a corrupt one falls back ----------------------------------
def flip_a_bit(folder: Path) -> None:
    shard = folder / "model" / "shard-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # same size: only the sha256 can tell
    shard.write_bytes(bytes(data))


def test_latest_one_behind_still_resumes_from_the_newest_intact(tmp_path):
    root = tmp_path / "ck"
    save(root, 2)
    save(root, 4)
    (root / "latest").write_text("step-0000002\n")  # killed between the commit and the update of latest
    assert ckpt.find_resume("auto", root) == root / "step-0000004"
    assert ckpt.choose_verified("auto", root) == (root / "step-0000004", [])


def test_corrupt_newest_falls_back_and_is_set_aside(tmp_path, capsys):
    root = tmp_path / "ck"
    save(root, 2)
    save(root, 4)
    flip_a_bit(root / "step-0000004")
    chosen, corrupt = ckpt.choose_verified("auto", root)
    assert chosen == root / "step-0000002" and corrupt == [root / "step-0000004"]
    err = capsys.readouterr().err
    assert "step-0000004 fails verification" in err and "sha256 mismatch" in err
    assert ckpt.clear_the_way(root, resume_step=2, run_id=RUN, corrupt=corrupt) == []
    assert (root / "step-0000004.damaged").is_dir() and not (root / "step-0000004").exists()
    save(root, 4)  # the resumed run can save step 4 again; the corrupt one stays for a look
    assert ckpt.verify_checkpoint(root / "step-0000004") == []
    assert ckpt.verify_checkpoint(root / "step-0000004.damaged")  # still there, still reported as corrupt
    with pytest.raises(CheckpointError, match="sha256 mismatch"):  # named explicitly, it must pass
        flip_a_bit(root / "step-0000004")
        ckpt.choose_verified(str(root / "step-0000004"), root)


def test_what_is_not_this_runs_is_never_moved(tmp_path):
    root = tmp_path / "ck"
    save(root, 2)
    save(root, 4, run_id=OTHER)
    flip_a_bit(root / "step-0000004")
    chosen, corrupt = ckpt.choose_verified("auto", root)
    [problem] = ckpt.clear_the_way(root, resume_step=2, run_id=RUN, corrupt=corrupt)
    assert "step-0000004" in problem and "move it away" in problem
    assert (root / "step-0000004").is_dir()


def test_resuming_an_older_checkpoint_never_saves_over_newer_ones(tmp_path):
    root = tmp_path / "ck"
    for step in (2, 4, 6):
        save(root, step)
    chosen, corrupt = ckpt.choose_verified(str(root / "step-0000002"), root)
    problems = ckpt.clear_the_way(root, resume_step=2, run_id=RUN, corrupt=corrupt)
    assert len(problems) == 2 and all("complete checkpoint" in p for p in problems)
    assert "step-0000004" in " ".join(problems) and "step-0000006" in " ".join(problems)


def test_no_intact_checkpoint_suggests_what_works(tmp_path):
    """The refusal names ways out that work: here, the deliberate overwrite deletes the damaged folders
    whose manifests prove them fft-dist checkpoints, and refuses the one it cannot vouch for."""
    cfg = config(tmp_path)
    root = Path(cfg.checkpoint.dir)
    save(root, 1, run_id=OTHER)
    save(root, 2, run_id=OTHER)
    shard = root / "step-0000002" / "model" / "shard-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: damaged, but its manifest is fine
    (root / "step-0000001" / "MANIFEST.json").write_text("{}")  # no valid manifest: nobody can vouch for it
    with pytest.raises(CheckpointError) as e:
        ckpt.find_resume("auto", root)
    assert "move them away" in str(e.value) and "resume=none checkpoint.overwrite=true" in str(e.value)
    cfg.checkpoint.overwrite = True
    with pytest.raises(ConfigError, match="step-0000001"):
        prepare_run_dir(cfg, "x\n")
    shutil.rmtree(root / "step-0000001")  # the person moves that one away, as the message says
    prepare_run_dir(cfg, "x\n")
    assert not (root / "step-0000002").exists()


# -- latest: a folder or a link there is the user's --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dir", "symlink"])
def test_latest_that_is_not_a_file_is_refused_before_training(tmp_path, kind):
    root = tmp_path / "ck"
    root.mkdir()
    if kind == "dir":
        (root / "latest").mkdir()
        (root / "latest" / "x").write_text("mine")
    else:
        (tmp_path / "target").write_text("secret")
        (root / "latest").symlink_to(tmp_path / "target")
    with pytest.raises(CheckpointError, match="latest is a"):
        ckpt.check_writable(root)
    if kind == "dir":
        assert (root / "latest" / "x").read_text() == "mine"
    else:
        assert (tmp_path / "target").read_text() == "secret"


# -- export: a killed export's leftover goes; another process's partial stays ------------------------------------
def test_export_removes_leftovers_of_killed_exports_only(tmp_path):
    from fft_dist.processes import host_tag

    folder = llama_checkpoint(tmp_path / "ck")
    out = tmp_path / "out"
    dead = tmp_path / ownership.temp_name(".out.partial", f"{host_tag()}{2**31 - 7:08x}{12345:016x}")
    dead.mkdir()
    (dead / "model-00001-of-00001.safetensors").write_bytes(b"half")
    remote = tmp_path / ownership.temp_name(".out.partial", f"{'0' * 8}{os.getpid():08x}{1:016x}")
    remote.mkdir()  # another host's export: not ours to judge
    user = tmp_path / ".out.partial-123"
    user.mkdir()
    ckpt.export_hf(folder, out)
    assert not dead.exists() and remote.is_dir() and user.is_dir()
    assert ownership.export_marker(out)["run_id"] is None


# -- the property test: random user files survive every operation -------------------------------------------------
NAMES = ["step-x", "step-", "step-12", "step-0000001.tmp", "step-0000003.old.tmp", "mydata.tmp", ".hidden.tmp",
         "latest.bak", "latest.tmp", "step-plan.md", "step-by-step", "notes", "hf.partial-1", ".hf.partial-999",
         "step-0000099.aaaaaaaaaaaa.tmp.keep", "MANIFEST.json", "index.json", "step-0000001.damaged.txt"]


def sprinkle(folder: Path, rng: random.Random) -> None:
    """A random set of a user's files, folders and links, some named like fft-dist's own."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in rng.sample(NAMES, k=8):
        path = folder / name
        kind = rng.choice(["file", "dir", "link"])
        if kind == "file":
            path.write_bytes(rng.randbytes(rng.randint(0, 64)))
        elif kind == "dir":
            path.mkdir()
            (path / "inner.txt").write_text(name)
        else:
            path.symlink_to(folder.parent / "outside-target")
    link = folder / f"step-{rng.randint(50, 90):07d}"  # a link named like a checkpoint, to a real checkpoint
    if not os.path.lexists(link):
        link.symlink_to(folder.parent / "foreign" / "step-0000001")


@pytest.mark.parametrize("seed", range(6))
def test_user_files_survive_save_prune_overwrite_export_and_resume(tmp_path, seed):
    rng = random.Random(seed)
    (tmp_path / "outside-target").write_text("outside")
    save(tmp_path / "foreign", 1, run_id=OTHER)
    cfg = config(tmp_path, keep_last=1)
    run, root = Path(cfg.run.dir), Path(cfg.checkpoint.dir)
    sprinkle(run, rng)
    sprinkle(root, rng)
    users = {**{f"run/{k}": v for k, v in tree(run).items()}}
    outside = tree(tmp_path / "foreign")

    run_id = claim(cfg, run)                                     # a fresh run claims run.dir
    for step in (1, 2, 3):                                       # saves and keep_last pruning
        save(root, step, keep_last=1, run_id=run_id)
    cfg.resume = "auto"
    chosen, corrupt = ckpt.choose_verified("auto", root)         # resume
    assert chosen == root / "step-0000003"
    assert ckpt.clear_the_way(root, resume_step=3, run_id=run_id, corrupt=corrupt) == []
    ckpt.load_checkpoint(strategy(steps=0), chosen)
    ckpt.export_hf(llama_checkpoint(tmp_path / "llama"), run / "hf", run_id=run_id)  # export, then again
    ckpt.export_hf(llama_checkpoint(tmp_path / "llama2"), run / "hf", run_id=run_id)
    cfg.resume, cfg.checkpoint.overwrite = "none", True          # a fresh run over it, on purpose
    claim(cfg, run)

    after = {f"run/{k}": v for k, v in tree(run).items()}
    lost = {k: v for k, v in users.items() if after.get(k) != v}
    assert not lost, f"user files changed or lost: {sorted(lost)}"
    assert tree(tmp_path / "foreign") == outside and (tmp_path / "outside-target").read_text() == "outside"
