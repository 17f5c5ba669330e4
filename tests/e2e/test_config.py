"""Every config group composes and validates; bad configs fail with messages that say what to change."""
from __future__ import annotations

import pytest

from helpers import fft_dist


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "Key 'max_stepz' not in 'TrainConfig'"),
    ("train.lr=abc", "could not be converted to Float"),
    ("train.precision=fp8", "expected one of [fp32, bf16, fp16, auto]"),
    ("parallelism=zero9", "Could not find 'parallelism/zero9'"),
    ("train.global_batch_size=10", "not divisible"),
    ("model.path=/definitely/not/here", "not a Hugging Face model folder"),
])
def test_cli_rejects_bad_config_before_any_rank_starts(override, message, tmp_path):
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", override, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "config error" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a rejected config"


def test_train_help_lists_groups_and_options_without_launching(tmp_path):
    proc = fft_dist("train", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "parallelism  fsdp, hsdp, none, zero2" in proc.stdout
    assert "train.lr : float" in proc.stdout and "Peak learning rate." in proc.stdout
    assert "checkpoint.keep_best : bool = False" in proc.stdout


def test_cfg_job_prints_the_resolved_config(tmp_path):
    proc = fft_dist("train", "--cfg", "job", f"run.dir={tmp_path / 'r'}", "train.lr=0.5", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.5" in proc.stdout and "${" not in proc.stdout
    assert not (tmp_path / "r").exists(), "--cfg job launches nothing and writes nothing"
    info = fft_dist("train", "--info", timeout=120)
    assert info.returncode == 0 and "bundled configs:" in info.stdout


def test_own_group_file_via_config_dir(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        "name: mine\narch:\n  model_type: llama\n  vocab_size: 2048\n  hidden_size: 48\n"
        "  intermediate_size: 96\n  num_hidden_layers: 1\n  num_attention_heads: 2\n  num_key_value_heads: 2\n")
    proc = fft_dist("train", "--config-dir", str(tmp_path / "conf"), "model=mine", "--cfg", "job", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: mine" in proc.stdout and "hidden_size: 48" in proc.stdout


@pytest.mark.parametrize("content,needle", [
    (b'{"prompt": "a", "completion": "b"}\n' * 3 + b'{"prompt": "\xff\xfe", "completion": "x"}\n', ":4: not UTF-8 text"),
    (b"PAR1\x00\x01\x02binary", ":1: a binary file"),
    (b'{"prompt": "a"}\n', "missing column(s) ['completion']"),
])
def test_bad_data_is_reported_once_before_launch(tmp_path, content, needle):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", f"data.path={data}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and str(data) in proc.stderr
    assert proc.stderr.count("data error") == 1 and "Traceback" not in proc.stderr
    assert "starting" not in proc.stdout, "no rank may start"
    assert not (tmp_path / "run").exists()


def test_missing_resume_path_is_a_checkpoint_error_before_launch(tmp_path):
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", f"resume={tmp_path / 'nope'}", timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "checkpoint error" in proc.stderr and str(tmp_path / "nope") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_garbage_model_config_is_a_named_checkpoint_error(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", f"model.path={folder}", timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert str(folder / "config.json") in proc.stderr and "Traceback" not in proc.stderr
