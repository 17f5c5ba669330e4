"""`fft-dist data` on a chat file, in a real process (issue 19): the loss spans of a real template (Qwen3's,
tests/fixtures/chat_templates/) and the columns the format does not read. In process: tests/unit/test_chat_layouts.py."""
from __future__ import annotations

import json

from chat_helpers import TEMPLATES
from helpers import fft_dist


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fft_dist_data_shows_the_spans_of_a_real_template(tmp_path):
    row = {"messages": [{"role": "user", "content": "Capital of Italy?"},
                        {"role": "assistant", "content": "Rome.", "reasoning_content": "Italy: Rome."}],
           "note": "checked by hand"}
    path = write_jsonl(tmp_path / "c.jsonl", [row] * 4)
    proc = fft_dist("data", f"data.path={path}", "data.format=chat", "data.eval_fraction=0",
                    f"data.chat_template={TEMPLATES / 'qwen3.jinja'}", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "<|im_start|>assistant\n[[<think>\nItaly: Rome.\n</think>\n\nRome.<|im_end|>\n]]" in proc.stdout
    assert "not read by data.format=chat: column(s) note" in proc.stdout
