"""Data problems that used to surface as a traceback (or a message without its line) after launch
are refused before launch with exit 2, naming the file, the line or column, and the fix (issue #15,
item 17): columns of the wrong type (parquet, arrow, save_to_disk; CSV is text), non-UTF-8 .txt
lines, a missing chat template file; and a bad JSONL line past the pre-launch check's reach stops
the cache build with exit 2 naming it."""
from __future__ import annotations

from fft_dist import cli
from helpers import fft_dist
from data_checks_shared import BAD_LINE, long_jsonl


def test_a_run_whose_cache_build_meets_that_line_exits_2_naming_it(long_jsonl, tmp_path, capsys):
    """After launch: the real `fft-dist train` (one rank, in the launcher's process) and `fft-dist data`."""
    proc = fft_dist("train", f"data.path={long_jsonl}", "data.max_examples=8", f"run.dir={tmp_path}/r",
                    "parallelism=none", "launcher.nproc_per_node=1", "model.arch.num_hidden_layers=1", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{long_jsonl}:{BAD_LINE}: malformed JSON" in proc.stderr, proc.stderr
    assert cli.data([f"data.path={long_jsonl}", "data.max_examples=8", f"data.cache_dir={tmp_path}/c"]) == 2
    assert f"{long_jsonl}:{BAD_LINE}: malformed JSON" in capsys.readouterr().err
