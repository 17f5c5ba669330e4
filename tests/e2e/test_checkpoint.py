"""The checkpoint format: save / resume / reshard / crash safety / bad checkpoints / export / HF load.

Multi-rank cases run real processes over gloo through ``python -m torch.distributed.run`` with
the sharded test strategy of tests/support/checkpoint_worker.py (FSDP-like row shards,
ZeRO-3-like flat pieces, ZeRO-2-like group partitions that straddle tensors, uneven splits).
Its AdamW updates are element-wise, so any resumed run must be *bit-identical* to an
uninterrupted single-process reference, whatever the world size or split.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from checkpoint_worker import FlatShardStrategy

import pytest
import torch

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointReader, format as fmt
from checkpoint_helpers import RUN
from helpers import descendants, REPO, SUPPORT
from checkpoint_shared import TOKENIZER, make_spec, reference, shapes_of, spec


WORKER = str(SUPPORT / "checkpoint_worker.py")


# -- helpers ------------------------------------------------------------------------------------------
def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "--monitor_interval", "0.2", WORKER, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def results(out: Path, n: int) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(n)]


def assert_matches(ref: FlatShardStrategy, checkpoint: Path) -> None:
    """Every parameter and optimizer-state element of `ref` equals the checkpoint's, bit for bit."""
    reader = CheckpointReader(checkpoint)
    n = 0
    for f in ref.fragments():
        got = reader.read(f.name, f.kind, f.flat_start, f.flat_stop)
        assert torch.equal(got, f.local), f"{f.name} ({f.kind}) differs: max {(got - f.local).abs().max()}"
        n += 1
    assert n == len(reader.names()) * 4  # param, step, exp_avg, exp_avg_sq


def run_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def spec_tied(tmp_path_factory) -> Path:
    return make_spec(tmp_path_factory.mktemp("spec") / "spec_tied.json", tie=True)


@pytest.fixture(scope="module")
def saved2(spec, tmp_path_factory) -> tuple[Path, list[dict]]:
    """2 ranks, ZeRO-2-like group split (tensors straddle ranks), 3 steps, a save every step, keep 2."""
    root = tmp_path_factory.mktemp("saved2") / "ckpts"
    out = root.parent / "out"
    run_ok(torchrun(2, "--spec", str(spec), "--ckpt-root", str(root), "--split", "group", "--steps", "3",
                    "--save-every", "1", "--keep-last", "2", "--out", str(out)))
    return root, results(out, 2)


# -- save, commit, prune --------------------------------------------------------------------------------
def test_save_layout_prune_info(spec, saved2):
    root, res = saved2
    assert (root / "latest").read_text().strip() == "step-0000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003"]  # keep_last=2
    c = root / "step-0000003"
    files = sorted(str(p.relative_to(c)) for p in c.rglob("*") if p.is_file())
    assert files == ["MANIFEST.json", "index.json", "model/shard-00000-of-00002.safetensors",
                     "model/shard-00001-of-00002.safetensors", "optim/shard-00000-of-00002.safetensors",
                     "optim/shard-00001-of-00002.safetensors", "tokenizer/tokenizer.json",
                     "tokenizer/tokenizer_config.json", "train_state.json"]
    assert ckpt.verify_checkpoint(c) == []
    info = ckpt.checkpoint_info(c)
    shapes = shapes_of(spec)
    assert (info["step"], info["world_size"], info["backend"]) == (3, 2, "flatshard-group")
    assert info["tensors"] == len(shapes)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    assert info["parameters"] == n_params
    assert info["model_bytes"] > 4 * n_params and info["optim_bytes"] > 8 * n_params
    state = ckpt.read_train_state(c)
    assert state["train_state"] == {"step": 3, "tokens_seen": 300}
    assert len(state["rng"]) == 2 and state["rng"][0] != state["rng"][1]
    assert state["config_yaml"] == "test: true\n" and state["model_config"]["vocab_size"] == 97
    # some tensor straddles the two ranks: its ranges live in both shard files
    index = json.loads((c / "index.json").read_text())
    straddling = [n for n, t in index["tensors"].items() if len({r[2] for r in t["kinds"]["param"]["ranges"]}) == 2]
    assert straddling
    # keys are name@kind@start, 1-D, read with safe_open directly
    from safetensors import safe_open

    with safe_open(str(c / "model/shard-00001-of-00002.safetensors"), framework="pt") as f:
        key = next(iter(f.keys()))
        name, kind, start = key.rsplit("@", 2)
        assert kind == "param" and f.get_tensor(key).dim() == 1 and f.metadata()["world_size"] == "2"


# -- resume and resharding (bit-exact against an uninterrupted single process) --------------------
def test_resume_1_rank_other_split_bit_exact(spec, saved2, tmp_path):
    root, _ = saved2
    s = FlatShardStrategy(shapes_of(spec), split="uneven", rank=0, world=1, seed=99)
    state = ckpt.load_checkpoint(s, ckpt.find_resume("auto", root))
    assert state["step"] == 3
    for step in range(3, 6):
        s.train_step(step)
    out = ckpt.save_checkpoint(s, ckpt_root=tmp_path, step=6, train_state={"step": 6}, keep_last=1, meta={},
                               run_id=RUN)
    assert_matches(reference(spec, 6), out)


def test_resume_3_ranks_rows_bit_exact(spec, saved2, tmp_path):
    """2 ranks (group split) -> 3 ranks (FSDP-like rows; 97 and 24 rows do not divide by 3)."""
    root, saved = saved2
    out = tmp_path / "out"
    run_ok(torchrun(3, "--spec", str(spec), "--ckpt-root", str(tmp_path / "c3"), "--split", "rows", "--steps", "6",
                    "--resume", str(root / "step-0000003"), "--out", str(out)))
    res = results(out, 3)
    assert_matches(reference(spec, 6), tmp_path / "c3" / "step-0000006")
    # RNG: ranks 0 and 1 continue their own streams; rank 2 (no saved peer) takes rank 0's
    for r in range(3):
        assert res[r]["rand_after_resume"] == saved[r % 2]["rand_after_save"]["3"]


def test_resume_2_ranks_same_world_auto(spec, saved2, tmp_path):
    """Same world size, another split (ZeRO-3-like flat pieces), resume=auto; own RNG per rank."""
    root, saved = saved2
    work = tmp_path / "c2"
    shutil.copytree(root, work)
    out = tmp_path / "out"
    run_ok(torchrun(2, "--spec", str(spec), "--ckpt-root", str(work), "--split", "flat", "--steps", "5",
                    "--resume", "auto", "--out", str(out)))
    res = results(out, 2)
    assert [r["resumed_from"] for r in res] == [str(work / "step-0000003")] * 2
    assert [r["rand_after_resume"] for r in res] == [s["rand_after_save"]["3"] for s in saved]
    assert_matches(reference(spec, 5), work / "step-0000005")
    assert (work / "latest").read_text().strip() == "step-0000005"


def test_bad_checkpoint_2_ranks_all_ranks_raise_the_same(spec, saved2, tmp_path):
    """A flipped byte in rank 1's optimizer shard: both ranks raise together (no hang, no partial load)."""
    root, _ = saved2
    bad = tmp_path / "bad"
    shutil.copytree(root / "step-0000003", bad)
    shard = bad / "optim/shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = torchrun(2, "--spec", str(spec), "--ckpt-root", str(tmp_path / "x"), "--resume", str(bad),
                    "--steps", "4", "--out", str(out), timeout=120)
    assert proc.returncode != 0
    errors = [r["error"] for r in results(out, 2)]
    assert errors[0] == errors[1] and "optim/shard-00001-of-00002.safetensors: sha256 mismatch" in errors[0]
    assert not (tmp_path / "x").exists()  # it never got to train or save


# -- crash safety: SIGKILL during a save -----------------------------------------------------------------
@pytest.mark.parametrize("point,rank,asynchronous", [
    ("mid_model_shard", "1", False), ("before_rename", "0", False),
    # checkpoint.async_save (issue 21): staging (the training thread), writing and committing (the writer thread)
    ("mid_stage", "1", True), pytest.param("mid_model_shard", "1", True, marks=pytest.mark.slow),
    ("before_rename", "0", True)])
def test_sigkill_during_save_keeps_previous(spec, tmp_path, point, rank, asynchronous):
    """2 ranks; one is SIGKILLed while staging, while writing its model shard, or (rank 0) just before the
    commit rename; with asynchronous saves the last two happen in the rank's background writer."""
    root = tmp_path / "ckpts"
    mode = ["--async-save"] if asynchronous else []
    proc = torchrun(2, "--spec", str(spec), "--ckpt-root", str(root), "--split", "uneven", "--steps", "4",
                    "--save-every", "2", "--keep-last", "1", *mode,
                    env={"FFT_DIST_FAULT_KILL_AT": point, "FFT_DIST_FAULT_KILL_RANK": rank,
                         "FFT_DIST_FAULT_KILL_STEP": "4"})
    assert proc.returncode != 0
    prev = root / "step-0000002"
    assert ckpt.verify_checkpoint(prev) == []
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert ckpt.find_resume("auto", root) == prev
    # the surviving rank may remove step-0000004.tmp when its collective fails (or be killed first)
    assert not (root / "step-0000004").exists()
    if point == "mid_model_shard":
        # resume=auto picks step 2, finishes bit-exactly, and the leftover .tmp is cleaned up
        run_ok(torchrun(2, "--spec", str(spec), "--ckpt-root", str(root), "--split", "rows", "--steps", "4",
                        "--resume", "auto", "--keep-last", "1", *mode))
        assert_matches(reference(spec, 4), root / "step-0000004")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004"]


@pytest.mark.parametrize("point", ["after_optim_shards", "before_manifest", "before_latest", "before_prune"])
def test_sigkill_at_commit_points_single_process(spec, tmp_path, point):
    """The rest of the commit sequence, in one process (no launcher) to keep the suite fast."""
    root = tmp_path / "ckpts"
    env = dict(os.environ, OMP_NUM_THREADS="1", FFT_DIST_FAULT_KILL_AT=point, FFT_DIST_FAULT_KILL_STEP="4")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, WORKER, "--spec", str(spec), "--ckpt-root",
                           str(root), "--steps", "4", "--save-every", "2", "--keep-last", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    prev = root / "step-0000002"
    assert ckpt.verify_checkpoint(prev) == []  # keep_last=1, yet the previous one is still there
    committed = point in ("before_latest", "before_prune")
    assert (root / "latest").read_text().strip() == ("step-0000004" if point == "before_prune" else "step-0000002")
    # before_latest: step 4 is committed and intact although `latest` still names step 2: resume=auto
    # takes the newest intact checkpoint, so step 4 is neither lost nor saved over
    assert ckpt.find_resume("auto", root) == (root / "step-0000004" if committed else prev)
    assert (root / "step-0000004").is_dir() is committed
    if point == "before_latest":
        run_ok(subprocess.run([sys.executable, WORKER, "--spec", str(spec), "--ckpt-root", str(root), "--steps", "6",
                               "--save-every", "2", "--keep-last", "1", "--resume", "auto"], cwd=REPO,
                              env={k: v for k, v in env.items() if not k.startswith("FFT_DIST_FAULT")},
                              capture_output=True, text=True, timeout=120))
        assert_matches(reference(spec, 6), root / "step-0000006")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000006"]


@pytest.mark.slow
def test_external_sigkill_while_writing(tmp_path):
    """SIGKILL every process of a 2-rank job from outside while it writes a ~45 MB checkpoint."""
    shapes = {"big.a": (1536, 1024), "big.b": (1000, 1001), "small": (7,)}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"tensors": [[n, list(s)] for n, s in shapes.items()]}))
    root = tmp_path / "ckpts"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           WORKER, "--spec", str(spec), "--ckpt-root", str(root),
           "--split", "flat", "--steps", "200", "--save-every", "1", "--keep-last", "2"]
    for attempt in range(3):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        killed = False
        while time.time() < deadline and proc.poll() is None:
            tmps = [p for p in root.glob("step-*.tmp") if any((p / "model").glob("*.safetensors"))] \
                if root.exists() else []
            committed = [p for p in root.glob("step-*") if fmt.parse_step(p.name) is not None] if tmps else []
            if tmps and any((p / "MANIFEST.json").is_file() for p in committed):
                time.sleep(0.02 * attempt)
                for pid in [*descendants(proc.pid), proc.pid]:  # the workers first, then the agent
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
        assert killed, "the job never reached a second save"
        found = ckpt.find_resume("auto", root)
        assert found is not None and ckpt.verify_checkpoint(found) == []
        assert int(found.name.split("-")[1]) >= 1
        shutil.rmtree(root)


# -- export to a Hugging Face folder ------------------------------------------------------------------------
def reference_model(checkpoint: Path):
    """The model the checkpoint holds, built directly from its tensors (the 'training model')."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = ckpt.read_train_state(checkpoint)
    mc = dict(state["model_config"])
    config = AutoConfig.for_model(mc.pop("model_type"), **{k: v for k, v in mc.items() if k != "transformers_version"})
    model = AutoModelForCausalLM.from_config(config).eval()
    reader = CheckpointReader(checkpoint)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader.read_full(name))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_export_roundtrip_logits(spec, spec_tied, saved2, tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tied:  # tied: a single-process save with an uneven split
        s = FlatShardStrategy(shapes_of(spec_tied), split="uneven", rank=0, world=1, seed=4)
        for step in range(2):
            s.train_step(step)
        meta = json.loads(spec_tied.read_text())
        checkpoint = ckpt.save_checkpoint(s, ckpt_root=tmp_path / "c", step=2, train_state={}, keep_last=1,
                                          meta={"model_config": meta["model_config"], "tokenizer_dir": str(TOKENIZER)},
                                          run_id=RUN)
    else:  # untied: the 2-rank checkpoint whose tensors straddle ranks
        checkpoint = saved2[0] / "step-0000003"
    ref = reference_model(checkpoint)
    out = tmp_path / "hf"
    summary = ckpt.export_hf(checkpoint, out, max_shard_size="12KB")
    assert summary["shards"] > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert ("lm_head.weight" in index["weight_map"]) is (not tied)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert torch.equal(a, b)  # in fact the same weights, bit for bit
    # bf16 export, one shard
    out16 = tmp_path / "hf16"
    assert ckpt.export_hf(checkpoint, out16, dtype="bfloat16")["shards"] == 1
    m16 = AutoModelForCausalLM.from_pretrained(str(out16))
    assert m16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(m16.model.embed_tokens.weight, ref.model.embed_tokens.weight.to(torch.bfloat16))


# -- memory: export streams tensor by tensor; a rank loading an HF folder reads only its ranges ----------
MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
import torch
from fft_dist import checkpoint as ckpt
from checkpoint_worker import FlatShardStrategy

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode, src, out = sys.argv[1:4]
if mode == "export":  # import the model code before measuring (the export builds the model on the meta device)
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM
    from transformers import conversion_mapping, core_model_loading
    GenerationConfig.from_model_config(AutoConfig.for_model("llama"))
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
base = rss("VmRSS")
if mode == "export":
    ckpt.export_hf(Path(src), Path(out), max_shard_size="40MB")
    extra = 0
else:
    shapes = json.loads(Path(out).read_text())
    s = FlatShardStrategy(shapes, split="rows", rank=0, world=8, seed=0)
    s.load_fragments(ckpt.HFFolderSource(Path(src)))
print(json.dumps({"growth": rss("VmHWM") - base}))
"""


def _probe(*args: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SUPPORT), env.get("PYTHONPATH")) if p)
    p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["growth"]


def test_export_and_hf_load_memory_stay_small(tmp_path):
    """Peak RSS (VmHWM, glibc told to return freed memory) of a fresh process, imports excluded."""
    from safetensors.torch import save_file

    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (2048, 1024) for i in range(12)}  # 12 x 8 MiB = 96 MiB
    model_bytes = sum(torch.Size(s).numel() * 4 for s in shapes.values())
    s = FlatShardStrategy(shapes, split="flat", rank=0, world=1, seed=0)
    s.train_step(0)  # + 192 MiB of AdamW state in the checkpoint
    from transformers import LlamaConfig

    c = ckpt.save_checkpoint(s, ckpt_root=tmp_path / "c", step=1, train_state={}, keep_last=1,
                             meta={"model_config": LlamaConfig().to_dict()}, run_id=RUN)
    growth = _probe("export", str(c), str(tmp_path / "hf"))
    print(f"export: peak RSS growth {growth / 2**20:.0f} MiB for {model_bytes / 2**20:.0f} MiB of weights")
    assert growth < 0.4 * model_bytes, f"export grew RSS by {growth / 2**20:.0f} MiB"
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) == 3  # 40 MB shards: 4 tensors of 8.4 MB each

    # an HF folder (2 files), loaded as rank 0 of 8: its own 1/8 (12 MiB) plus the file pages it mapped while
    # reading (safetensors reads through mmap; ~2x the bytes read with readahead, released at close)
    hf = tmp_path / "hf_in"
    hf.mkdir()
    names = list(shapes)
    weight_map = {}
    for k, part in enumerate((names[:6], names[6:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {n: s.params[n].detach().reshape(shapes[n]) for n in part}
        save_file(tensors, str(hf / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    growth = _probe("hf", str(hf), str(tmp_path / "shapes.json"))
    print(f"HF load as rank 0 of 8: peak RSS growth {growth / 2**20:.0f} MiB, its shard included")
    assert growth < 0.5 * model_bytes, f"rank 0 of 8 grew RSS by {growth / 2**20:.0f} MiB"
