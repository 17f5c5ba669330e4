"""Forgetting: how much of corpus A a model keeps while it is fine-tuned on corpus B, knob by knob.

    python bench/forgetting.py [--seeds 0 1 2] [--jobs 2] [--quick] [--no-record]
    python bench/forgetting.py --build-corpus     # rewrites bench/data/python_reference_prose.jsonl

A is the shipped docstring -> body pairs (fft_dist/assets/stdlib_docstrings.jsonl: code). B is prose:
the paragraphs of the Python Language Reference that CPython ships in `pydoc_data/topics.py` (PSF-2.0;
code blocks, grammar and signature lines dropped), written once by --build-corpus to
bench/data/python_reference_prose.jsonl. Both are split by the sha256 of each row into train /
validation / test, so the split does not depend on file order.

1. A base model (tiny Llama, 4 layers) is trained on A's train split and exported.
2. From that base, B is fine-tuned with (a) plain fine-tuning, (b) distillation from the base
   (loss.kd.weight), (c) L2-SP (loss.l2sp.weight), (d) 10% replay of A (data.mixture), (e) the lower
   2 of 4 layers and the embeddings frozen (model.freeze_layers), (f) layer-wise lr decay
   (optimizer.layer_lr_decay), (g) interpolation with the base at export (export --interpolate-base,
   applied to (a)'s final checkpoint and evaluated at step 0 of a 1-step run).
   Every run evaluates B's validation split (its eval_path) and, through eval.sets, A's validation
   and test splits and B's test split, at step 0 (the base) and at the end.
3. The knobs with a strength (GRID) are tried on seed 0 with every grid value; the value is chosen on
   the validation splits only (SELECT_RULE) and then run on the other seeds. The table reports the
   test splits: the rise of A's loss (after - before) and B's final loss, mean +- std over the seeds.

Everything is fp32, parallelism=none, one process per run, OMP_NUM_THREADS=1; --jobs runs that many
fine-tunes at once. It prints the table, a text scatter of the trade-off (matplotlib is not a
dependency) and whether the target holds: (b) or (c) cuts the rise of A's loss by >= 30% against
(a) while B's test loss stays within 5% of (a)'s. The result, with the command, machine and date,
is appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine_info import job_env, machine, record, versions

REPO = Path(__file__).resolve().parents[1]
CORPUS_A = REPO / "fft_dist" / "assets" / "stdlib_docstrings.jsonl"
CORPUS_B = Path(__file__).resolve().parent / "data" / "python_reference_prose.jsonl"
PYTHON = sys.executable

SPLIT_A = (150, 150)  # validation, test rows (the rest trains the base)
SPLIT_B = (40, 40)
MODEL = ["model.arch.hidden_size=64", "model.arch.intermediate_size=192", "model.arch.num_hidden_layers=4",
         "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"]
COMMON = ["parallelism=none", "launcher.nproc_per_node=1", "model.tokenizer=bundled", "data.max_length=128",
          "data.eval_fraction=0", "train.precision=fp32", "train.global_batch_size=16", "train.micro_batch_size=16",
          "eval.every_steps=0", "eval.micro_batch_size=16"]
BASE_STEPS, BASE_LR = 200, 3e-3
FT_STEPS, FT_LR = 50, 1e-3
QUICK = {"base_steps": 60, "ft_steps": 20}

# Fixed before any run: each knob's grid, tried on seed 0 and chosen on the validation splits.
GRID = {
    "b kd": ("loss.kd.weight", [0.3, 1.0, 3.0]),
    "c l2sp": ("loss.l2sp.weight", [10.0, 30.0, 100.0]),
    "f layer decay": ("optimizer.layer_lr_decay", [0.5, 0.8]),
    "g interpolate": ("export --interpolate-base", [0.25, 0.5]),
}
FIXED = {
    "a plain": [],
    "d replay 10%": None,  # a data.mixture, built in variant_overrides
    "e freeze lower half": ["model.freeze_layers=2"],
}
SELECT_RULE = ("the grid value with the smallest rise of A's validation loss among those whose B validation "
               "loss is within 5% of plain fine-tuning's (seed 0); if none is, the lowest B validation loss")


# ---------------------------------------------------------------------------------------------- corpora

def build_corpus(out: Path = CORPUS_B) -> int:
    """Prose paragraphs of the Python Language Reference (pydoc_data.topics, shipped with CPython)."""
    import pydoc_data.topics as topics

    seen, rows = set(), []
    for key in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[key]):
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines):  # code examples and grammar are indented
                continue
            if any(re.fullmatch(r"[*=\-]+", line.strip()) for line in lines):  # headings
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) < 150 or sum(c.isalpha() or c in " ,." for c in text) / len(text) < 0.9:
                continue  # short lines and signature lists
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "source": f"pydoc_data.topics[{key!r}]"})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} paragraphs ({sum(len(r['text']) for r in rows)} characters) from Python "
          f"{sys.version.split()[0]}'s pydoc_data.topics to {out}")
    return len(rows)


def split_rows(path: Path, n_val: int, n_test: int, keep: tuple[str, ...], work: Path, name: str) -> dict[str, Path]:
    """train / val / test files by the sha256 of each row's text (order-independent, fixed)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: hashlib.sha256(json.dumps([r[k] for k in keep]).encode()).hexdigest())
    parts = {"val": rows[:n_val], "test": rows[n_val:n_val + n_test], "train": rows[n_val + n_test:]}
    out = {}
    for part, rs in parts.items():
        out[part] = work / f"{name}_{part}.jsonl"
        with open(out[part], "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps({k: r[k] for k in keep}, ensure_ascii=False) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- runs

def fft_dist(args: list[str], log: Path) -> None:
    cmd = [PYTHON, "-m", "fft_dist.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(REPO), capture_output=True, text=True, timeout=1800)
    log.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")


def eval_sets(files: dict) -> list[str]:
    out = []
    for name, (path, fmt) in {"a_val": (files["a"]["val"], "prompt_completion"),
                              "a_test": (files["a"]["test"], "prompt_completion"),
                              "b_test": (files["b"]["test"], "text")}.items():
        out += [f"+eval.sets.{name}.path={path}", f"+eval.sets.{name}.format={fmt}"]
    return out


def losses(run_dir: Path) -> dict[str, dict[str, float]]:
    """{'before': ..., 'after': ...}: the first and last evaluation's a_val, a_test, b_val, b_test losses."""
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    pick = lambda r: {"a_val": r["eval_a_val_loss"], "a_test": r["eval_a_test_loss"],  # noqa: E731
                      "b_val": r.get("eval_prose_loss", r["eval_loss"]), "b_test": r["eval_b_test_loss"]}
    return {"before": pick(evals[0]), "after": pick(evals[-1])}


def train_base(files: dict, work: Path, steps: int) -> Path:
    run = work / "base"
    fft_dist(["train", *COMMON, *MODEL, f"data.path={files['a']['train']}", "data.format=prompt_completion",
              f"data.eval_path={files['a']['val']}", f"train.max_steps={steps}", f"train.lr={BASE_LR}",
              "train.seed=0", f"run.dir={run}", "checkpoint.export_final=true"], work / "base.log")
    return run / "hf"


def variant_overrides(variant: str, value: float | None, files: dict) -> list[str]:
    if variant == "d replay 10%":
        return ["data.path=null", f"+data.mixture.prose.path={files['b']['train']}", "+data.mixture.prose.format=text",
                "+data.mixture.prose.weight=0.9",
                f"+data.mixture.prose.eval_path={files['b']['val']}", f"+data.mixture.replay.path={files['a']['train']}",
                "+data.mixture.replay.format=prompt_completion", "+data.mixture.replay.weight=0.1"]
    if variant in FIXED:
        return list(FIXED[variant])
    key, _ = GRID[variant]
    return [] if variant == "g interpolate" else [f"{key}={value}"]


def fine_tune(variant: str, value: float | None, seed: int, *, base: Path, files: dict, work: Path,
              steps: int) -> dict:
    tag = re.sub(r"[^a-z0-9.]+", "_", f"{variant} {'' if value is None else value} s{seed}".lower())
    run = work / tag
    data = [] if variant == "d replay 10%" else [f"data.path={files['b']['train']}", "data.format=text",
                                                 f"data.eval_path={files['b']['val']}"]
    fft_dist(["train", *COMMON, f"model.path={base}", *data, *variant_overrides(variant, value, files),
              *eval_sets(files),
              f"train.max_steps={steps}", f"train.lr={FT_LR}", f"train.seed={seed}", f"run.dir={run}"],
             work / f"{tag}.log")
    return {"variant": variant, "value": value, "seed": seed, "run": run, **losses(run)}


def interpolate(plain: dict, alpha: float, *, base: Path, files: dict, work: Path) -> dict:
    """(1 - alpha) * plain's final weights + alpha * base, evaluated at step 0 of a 1-step run (lr 1e-12: 0 is refused)."""
    tag = f"g_interpolate_{alpha}_s{plain['seed']}"
    out = work / f"{tag}_hf"
    ckpt = sorted((plain["run"] / "checkpoints").glob("step-*"))[-1]
    fft_dist(["export", str(ckpt), str(out), "--interpolate-base", str(alpha), "--base", str(base)],
             work / f"{tag}_export.log")
    run = work / tag
    fft_dist(["train", *COMMON, f"model.path={out}", f"data.path={files['b']['train']}", "data.format=text",
              f"data.eval_path={files['b']['val']}", *eval_sets(files), "train.max_steps=1", "train.lr=1e-12",
              "optimizer.weight_decay=0", f"train.seed={plain['seed']}", f"run.dir={run}",
              "checkpoint.save_final=false"], work / f"{tag}.log")
    after = losses(run)["before"]  # the interpolated weights, before the (lr 0) step
    return {"variant": "g interpolate", "value": alpha, "seed": plain["seed"], "run": run,
            "before": plain["before"], "after": after}


# ---------------------------------------------------------------------------------------------- analysis

def rise(r: dict, split: str) -> float:
    return r["after"][f"a_{split}"] - r["before"][f"a_{split}"]


def choose(variant: str, grid_runs: list[dict], plain0: dict) -> float:
    """SELECT_RULE, on the validation splits of seed 0 only."""
    ok = [r for r in grid_runs if r["after"]["b_val"] <= 1.05 * plain0["after"]["b_val"]]
    best = min(ok, key=lambda r: rise(r, "val")) if ok else min(grid_runs, key=lambda r: r["after"]["b_val"])
    return best["value"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(final: dict[str, list[dict]], chosen: dict[str, float]) -> tuple[list[dict], str]:
    rows = []
    for variant, runs in final.items():
        ra, bt = mean_std([rise(r, "test") for r in runs]), mean_std([r["after"]["b_test"] for r in runs])
        rows.append({"variant": variant, "value": chosen.get(variant), "rise": ra, "b_test": bt,
                     "a_before": runs[0]["before"]["a_test"], "b_before": runs[0]["before"]["b_test"], "n": len(runs)})
    plain = rows[0]
    lines = ["| variant | knob (chosen on validation) | rise of A's test loss | vs (a) | B test loss | vs (a) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        knob = "-" if r["value"] is None else f"{GRID[r['variant']][0]}={r['value']:g}"
        cut = 1 - r["rise"][0] / plain["rise"][0] if plain["rise"][0] else float("nan")
        rel_b = r["b_test"][0] / plain["b_test"][0] - 1
        lines.append(f"| {r['variant']} | {knob} | {r['rise'][0]:+.3f} ± {r['rise'][1]:.3f} | "
                     f"{'-' if r is plain else f'{-cut:+.0%}'} | {r['b_test'][0]:.3f} ± {r['b_test'][1]:.3f} | "
                     f"{'-' if r is plain else f'{rel_b:+.1%}'} | {r['n']} |")
    return rows, "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    plain = rows[0]
    out = []
    for r in rows:
        if r["variant"] not in ("b kd", "c l2sp"):
            continue
        cut = 1 - r["rise"][0] / plain["rise"][0]
        rel_b = r["b_test"][0] / plain["b_test"][0] - 1
        ok = cut >= 0.30 and rel_b <= 0.05
        out.append(f"{r['variant']}: cuts the rise of A's loss by {cut:.0%} (target >= 30%), B's loss {rel_b:+.1%} "
                   f"(target <= +5%): {'MET' if ok else 'NOT met'}")
    met = any("MET" in line and "NOT" not in line for line in out)
    return "\n".join(out) + f"\n**Target {'met' if met else 'NOT met'}**: " + (
        "(b) or (c) cuts the rise of A's loss by >= 30% against (a) with B's loss within 5%." if met else
        "neither (b) nor (c) cuts the rise of A's loss by >= 30% against (a) with B's loss within 5%.")


def scatter(rows: list[dict], width: int = 56, height: int = 16) -> str:
    """A text plot: x = B's test loss (lower is better at B), y = rise of A's loss (lower forgets less)."""
    xs, ys = [r["b_test"][0] for r in rows], [r["rise"][0] for r in rows]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1e-9), (y1 if y1 > y0 else y0 + 1e-9)
    grid = [[" "] * (width + 1) for _ in range(height + 1)]
    for r, x, y in zip(rows, xs, ys):
        grid[height - round((y - y0) / (y1 - y0) * height)][round((x - x0) / (x1 - x0) * width)] = r["variant"][0]
    lines = [f"rise of A's test loss (y, {y0:+.3f} .. {y1:+.3f}) against B's test loss (x, {x0:.3f} .. {x1:.3f})"]
    lines += ["|" + "".join(row) for row in grid] + ["+" + "-" * (width + 1)]
    lines.append("letters: " + ", ".join(r["variant"] for r in rows) + "; lower left is better on both")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunes run at once (one process each)")
    ap.add_argument("--quick", action="store_true", help=f"fewer steps {QUICK} (a smoke run, not a result)")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--build-corpus", action="store_true")
    a = ap.parse_args(argv)
    if a.build_corpus:
        build_corpus()
        return
    base_steps, ft_steps = (QUICK["base_steps"], QUICK["ft_steps"]) if a.quick else (BASE_STEPS, FT_STEPS)
    t0 = time.time()
    work = a.work or Path(tempfile.mkdtemp(prefix="fft-forgetting-"))
    work.mkdir(parents=True, exist_ok=True)
    files = {"a": split_rows(CORPUS_A, *SPLIT_A, ("prompt", "completion"), work, "a"),
             "b": split_rows(CORPUS_B, *SPLIT_B, ("text",), work, "b")}
    base = train_base(files, work, base_steps)
    t_base = time.time() - t0
    print(f"base: {t_base:.0f} s", flush=True)
    ft = dict(base=base, files=files, work=work, steps=ft_steps)
    pool = ThreadPoolExecutor(max(1, a.jobs))
    seed0, rest = a.seeds[0], a.seeds[1:]
    # round 1: seed 0 of every variant and grid value
    jobs = [("a plain", None, seed0), ("d replay 10%", None, seed0), ("e freeze lower half", None, seed0)]
    jobs += [(v, x, seed0) for v, (_, xs) in GRID.items() if v != "g interpolate" for x in xs]
    first = list(pool.map(lambda j: fine_tune(*j, **ft), jobs))
    plain0 = first[0]
    alphas = GRID["g interpolate"][1]
    first += list(pool.map(lambda x: interpolate(plain0, x, base=base, files=files, work=work), alphas))
    chosen = {v: choose(v, [r for r in first if r["variant"] == v], plain0) for v in GRID}
    print("chosen on validation:", chosen, flush=True)
    # round 2: the other seeds at the chosen values (interpolation after its plain run)
    jobs = [(v, chosen.get(v), s) for v in ["a plain", *[v for v in GRID if v != "g interpolate"],
                                            "d replay 10%", "e freeze lower half"] for s in rest]
    second = list(pool.map(lambda j: fine_tune(*j, **ft), jobs))
    plains = [r for r in second if r["variant"] == "a plain"]
    second += list(pool.map(lambda p: interpolate(p, chosen["g interpolate"], base=base, files=files, work=work),
                            plains))
    order = ["a plain", "b kd", "c l2sp", "d replay 10%", "e freeze lower half", "f layer decay", "g interpolate"]
    final = {v: [r for r in first + second if r["variant"] == v and r["value"] == chosen.get(v)] for v in order}
    rows, table = summarise(final, chosen)
    wall = time.time() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = children.ru_utime + children.ru_stime
    grid_lines = ["| variant | knob | A val rise (seed 0) | B val loss (seed 0) |", "|---|---|---|---|"]
    for r in first:
        knob = "-" if r["value"] is None else f"{GRID[r['variant']][0]}={r['value']:g}"
        grid_lines.append(f"| {r['variant']} | {knob} | {rise(r, 'val'):+.3f} | {r['after']['b_val']:.3f} |")
    cmd = "python bench/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"## Forgetting: fine-tuning on prose after code, knob by knob ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {machine()}",
        f"- versions: {versions('torch', 'transformers')}",
        f"- job: tiny Llama (4 layers, hidden 64, vocab 2048), fp32, parallelism=none, 1 process per run, "
        f"OMP_NUM_THREADS=1, {a.jobs} run(s) at once. Base: {base_steps} steps on A's train split "
        f"(lr {BASE_LR:g}, batch 16 x 128 tokens). Fine-tunes: {ft_steps} steps on B's train split (lr {FT_LR:g}, "
        f"batch 16, cosine). A = stdlib docstring->body pairs (val {SPLIT_A[0]} / test {SPLIT_A[1]} rows); "
        f"B = Python Language Reference prose ({CORPUS_B.relative_to(REPO)}, val {SPLIT_B[0]} / test {SPLIT_B[1]}).",
        f"- choice of each knob: grid {{{', '.join(f'{k}: {v[1]}' for k, v in GRID.items())}}}, on seed 0, by "
        f"{SELECT_RULE}; seeds {a.seeds}; the table is on the test splits, mean ± std over seeds.",
        f"- before fine-tuning (the base): A test loss {rows[0]['a_before']:.3f}, B test loss {rows[0]['b_before']:.3f}.",
        f"- wall time: {wall:.0f} s in all (base {t_base:.0f} s); CPU time of all its processes {cpu:.0f} s "
        f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        "",
        table,
        "",
        verdict(rows),
        "",
        "Grid on the validation splits (seed 0):",
        "",
        *grid_lines,
        "",
        "```",
        scatter(rows),
        "```",
    ])
    if a.quick:
        text = text.replace("## Forgetting:", "## Forgetting (--quick smoke run, not a result):")
    record(text, no_record=a.no_record or a.quick)
    (work / "forgetting.md").write_text(text + "\n")
    pool.shutdown()
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
