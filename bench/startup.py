"""Where fft-dist's time before the first step goes, next to a plain loop: a timeline per process.

    python bench/startup.py [--repeat 3] [--steps 2] [--variants ...] [--before REV] [--no-record]

Runs bench/throughput.py's job (tiny_llama, identical generated rows, micro 4 x seq 128) as
`fft-dist train` and as the hand-written loops, with bench/startup_hook/ on PYTHONPATH: every
Python process of the job (launcher, torchrun's agent, ranks) then logs when it came up and when
fft-dist's start-up phases ended (launcher compose/validate, preflight, run dir, agent start;
rank imports, config, process group, tokenizer, data, model build + strategy setup, first step).
The package carries no timing code: the hook wraps its functions as they are imported.

"outside steps" is the whole command's wall time less the sum of its logged step times: start-up
plus teardown, measured the same way for fft-dist and the loops. "CPU time" is user + system time
of every process of the job (getrusage of the reaped children): start-up is CPU-bound work
(imports, encoding, init), and CPU time moves far less than wall time on a shared machine. --before REV also runs the
fft-dist variants from `git archive REV` (e.g. the commit before a start-up change), interleaved
with the current tree, so before and after come from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine_info import machine, record, versions
from throughput import REPO, VARIANTS, command, env, model_arch, step_times, write_rows

HOOK = Path(__file__).resolve().parent / "startup_hook"
DEFAULT = ["fft-dist none", "hand single", "fft-dist fsdp", "hand fsdp2"]


def export_tree(rev: str, dest: Path) -> Path:
    """The package as of git revision `rev`, unpacked into `dest` (runs from there via PYTHONPATH)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "fft_dist", "conf"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_once(variant: str, *, tree: Path, work: Path, data: Path, arch: Path, steps: int) -> dict:
    cmd, out = command(variant, work=work, data=data, arch=arch, steps=steps, micro=4, seq=128)
    log = work / "startup.log"
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(HOOK), str(tree), e["PYTHONPATH"]])
    e["STARTUP_LOG"] = str(log)
    t0 = time.time()
    e["STARTUP_T0"] = repr(t0)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=tree, env=e, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    times, _ = step_times(variant, out)
    events: dict[str, float] = {}
    pids: list[str] = []
    for line in log.read_text().splitlines():
        pid, event, t = line.split("\t")
        if event.startswith("python up"):
            pids.append(pid)
            event = f"python up (process {len(pids)})"
        events.setdefault(event, float(t))  # rank 0 of several: the first to get there
    return {"wall_s": wall, "outside_steps_s": wall - sum(times), "cpu_s": cpu, "events": events,
            "processes": len(pids)}


def summarise(runs: dict[str, list[dict]]) -> str:
    lines = ["| variant | whole command (s) | outside steps (s) | CPU time, all processes (s) | processes |",
             "|---|---|---|---|---|"]
    for v, rs in runs.items():
        lines.append(f"| {v} | {statistics.median(r['wall_s'] for r in rs):.2f} | "
                     f"{statistics.median(r['outside_steps_s'] for r in rs):.2f} | "
                     f"{statistics.median(r['cpu_s'] for r in rs):.2f} | {rs[0]['processes']} |")
    for v, rs in runs.items():
        if not VARIANTS[v.removesuffix(' (before)')][0] == "fft":
            continue
        times = defaultdict(list)
        for r in rs:
            for event, t in r["events"].items():
                times[event].append(t)
        order = sorted(times, key=lambda ev: statistics.median(times[ev]))
        lines += ["", f"{v}: seconds since the command started (median of {len(rs)})", "",
                  "| event | t (s) | since previous (s) |", "|---|---|---|"]
        prev = 0.0
        for event in order:
            t = statistics.median(times[event])
            lines.append(f"| {event} | {t:.2f} | {t - prev:+.2f} |")
            prev = t
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--before", help="git revision: also run the fft-dist variants from that tree")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--json", help="also write the raw runs to this file")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fft-dist-bench-startup-"))
    try:
        data, arch = root / "rows.jsonl", root / "arch.json"
        write_rows(data, n=64, seq=128)
        arch.write_text(json.dumps(model_arch()))
        plan = [(v, REPO, v) for v in args.variants]
        if args.before:
            old = export_tree(args.before, root / "before")
            plan += [(v, old, f"{v} (before)") for v in args.variants if VARIANTS[v][0] == "fft"]
        runs: dict[str, list[dict]] = defaultdict(list)
        for i in range(args.repeat):
            for variant, tree, label in plan:
                work = Path(tempfile.mkdtemp(dir=root))
                r = run_once(variant, tree=tree, work=work, data=data, arch=arch, steps=args.steps)
                print(f"round {i + 1}/{args.repeat} {label}: {r['wall_s']:.2f} s, outside steps "
                      f"{r['outside_steps_s']:.2f} s", flush=True)
                runs[label].append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs))
    text = "\n".join([
        f"## Start-up: where the time before the first step goes ({time.strftime('%Y-%m-%d %H:%M %Z')})", "",
        f"- command: `python bench/startup.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}",
        f"- versions: {versions('torch', 'deepspeed', 'transformers')}",
        f"- job: bench/throughput.py's (tiny_llama, micro 4 x seq 128, identical generated rows), {args.steps} "
        f"steps, {args.repeat} interleaved round(s); the none / single pair is 1 process, the rest 2 ranks"
        + (f"; '(before)' = the package at {args.before}" if args.before else ""),
        "", summarise(runs), ""])
    record(text, no_record=args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
