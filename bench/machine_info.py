"""The machine line every bench/RESULTS.md entry carries (results mean nothing without it), and the
environment a bench's fft-dist jobs run under."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions(*modules: str) -> str:
    out = []
    for mod in modules:
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            out.append(f"{mod} missing")
    return ", ".join(out)


def record(text: str, results_md: Path | None = None, *, no_record: bool = False) -> None:
    """Print a result and append it to bench/RESULTS.md (created with a title if new); --no-record only prints."""
    print("\n" + text)
    if no_record:
        return
    results_md = results_md or Path(__file__).resolve().parent / "RESULTS.md"
    head = "" if results_md.exists() else "# Benchmark results\n\n"
    with open(results_md, "a", encoding="utf-8") as f:
        f.write(head + text + "\n")
    print(f"appended to {results_md}")


def job_env(src: Path) -> dict:
    """os.environ for an fft-dist job of a bench: one thread per rank, offline, `src` importable first, and
    no rank variables of an outer launcher."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), e.get("PYTHONPATH", "")) if p)
    for k in ("FFT_DIST_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e
