"""`fft-dist ckpt verify|info` and `fft-dist export` through the real console entry point:
the README's command shapes, exit codes (0 ok, 2 usage error, 4 bad checkpoint), no tracebacks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_helpers import edit_json, llama_checkpoint
from helpers import fft_dist


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A checkpoint root with step 1 and step 2 of a tiny Llama; `latest` names step 2."""
    root = tmp_path_factory.mktemp("cli") / "checkpoints"
    llama_checkpoint(root, 1)
    llama_checkpoint(root, 2)
    return root


def run(*args: str, rc: int) -> tuple[str, str]:
    proc = fft_dist(*args, timeout=120)
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_readme_command_shapes_with_latest(root, tmp_path):
    """The README's `ckpt verify|info runs/<run>/checkpoints/latest` and `export .../latest out/hf`."""
    out, _ = run("ckpt", "verify", str(root / "latest"), rc=0)
    assert "step-0000002 is complete and every checksum matches" in out
    out, _ = run("ckpt", "info", str(root / "latest"), rc=0)
    info = json.loads(out)
    assert info["step"] == 2 and info["path"] == str(root / "step-0000002") and info["complete"] is True
    hf = tmp_path / "out" / "hf"
    run("export", str(root / "latest"), str(hf), rc=0)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert "model.embed_tokens.weight" in index["weight_map"] and (hf / "config.json").is_file()


def test_bad_checkpoint_exits_4_with_a_named_error(root, tmp_path):
    import shutil

    bad = tmp_path / "step-0000002"
    shutil.copytree(root / "step-0000002", bad)
    mpath = bad / "MANIFEST.json"
    mpath.write_text(mpath.read_text().replace('"size"', '"sizd"', 1))  # a one-bit flip: s-i-z-e -> s-i-z-d
    for args in (("ckpt", "verify", str(bad)), ("ckpt", "info", str(bad)), ("export", str(bad), str(tmp_path / "o"))):
        _, err = run(*args, rc=4)
        assert "MANIFEST.json" in err and "'size'" in err, err
    assert not (tmp_path / "o").exists()
    # a shard path that leaves the checkpoint folder
    mpath.write_text(mpath.read_text().replace('"sizd"', '"size"', 1))
    edit_json(bad, "MANIFEST.json", lambda m: m["files"].update({"../../x": m["files"]["index.json"]}),
              fix_manifest=False)
    _, err = run("ckpt", "verify", str(bad), rc=4)
    assert "'../../x'" in err and "leaves the checkpoint folder" in err


def test_export_usage_errors_exit_2(root, tmp_path):
    _, err = run("export", str(root), str(tmp_path / "a"), "--max-shard-size", "12XB", rc=2)
    assert "--max-shard-size" in err and "12XB" in err
    _, err = run("export", str(root), str(tmp_path / "a"), "--max-shard-size", "0", rc=2)
    assert "--max-shard-size" in err
    assert not (tmp_path / "a").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    _, err = run("export", str(root / "latest"), str(full), rc=2)
    assert "not empty" in err and "--force" in err and (full / "notes.txt").read_text() == "keep me"
    run("export", str(root / "latest"), str(full), "--force", "--max-shard-size", "4KB", rc=0)
    assert not (full / "notes.txt").exists() and len(list(full.glob("model-*.safetensors"))) > 1
