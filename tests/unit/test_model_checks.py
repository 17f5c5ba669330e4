"""Model, backend and tracker settings that used to fail inside a rank (a traceback, exit 1) are
refused before launch with exit 2 (issue #15, items 15 and 17): a model folder with custom code
(never run, never prompted for), attention heads, data.max_length past the model's positions,
nccl without CUDA, flash attention without its package or GPUs, W&B online without an API key.
Dry runs (in-process, nothing starts) except where the real entry point's behaviour is the point."""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
from transformers import GPT2Config, OPTConfig, Qwen2Config

from fft_dist.config import ConfigError, ModelConfig
from helpers import REPO
from launch_checks import dry, dry_ok
from model_checks_shared import SMALL, custom_code_folder, no_cuda


def refused(*overrides: str, expect: tuple[str, ...]) -> str:
    proc = dry(*overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for text in expect:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    return proc.stderr


def test_custom_code_is_refused_for_a_known_model_type_and_in_a_tokenizer_folder(tmp_path):
    marker = tmp_path / "MARKER"
    folder = custom_code_folder(tmp_path / "llama", marker, model_type="llama")  # transformers would ignore it
    refused(f"model.path={folder}", expect=("never runs code", "delete the auto_map"))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok_x.XTok", None]}}))
    refused(f"model.tokenizer={tok}", expect=(f"model.tokenizer={tok}", "tokenizer_config.json", "never runs code"))
    assert not marker.exists()


def test_every_transformers_auto_class_call_passes_trust_remote_code_false():
    """from_pretrained / from_config of the Auto* classes: explicitly False, never transformers' default
    (which prompts on a terminal)."""
    calls = []
    for path in sorted((REPO / "fft_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.lower().startswith("auto")):
                ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert len(calls) >= 4 and all(ok for _, ok in calls), calls


# -- item 17: the model's shape and positions -----------------------------------------------------------
def test_attention_heads_that_do_not_split_the_model_are_refused():
    refused("model.arch.num_attention_heads=5", expect=("model.arch.num_attention_heads=5", "model.arch.hidden_size=128"))
    refused("model.arch.num_key_value_heads=3", expect=("model.arch.num_attention_heads=4",
                                                       "model.arch.num_key_value_heads=3"))
    refused("model=gpt2", "model.arch.n_head=5", expect=("model.arch.n_head=5", "model.arch.n_embd=768"))


def test_heads_in_a_model_folder_config_are_refused(tmp_path):
    Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                **SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 6, "num_key_value_heads": 4}))
    refused(f"model.path={tmp_path}", expect=(f"num_attention_heads=6 in {tmp_path}/config.json",))


def test_max_length_past_learned_positions_is_refused_and_past_rotary_ones_warned(tmp_path):
    refused("model=gpt2", "data.max_length=2048", expect=("data.max_length=2048", "n_positions=1024",
                                                          "data.max_length<=1024"))
    GPT2Config(n_positions=64, n_embd=64, n_head=4, **SMALL).save_pretrained(tmp_path / "gpt2")
    refused(f"model.path={tmp_path / 'gpt2'}", "data.max_length=128", expect=("n_positions=64",))
    # no n_positions, no rotary settings: learned absolute positions (OPT)
    OPTConfig(max_position_embeddings=64, hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
              **SMALL).save_pretrained(tmp_path / "opt")
    refused(f"model.path={tmp_path / 'opt'}", "data.max_length=128", expect=("max_position_embeddings=64",))
    proc = dry("data.max_length=1024")  # tiny_llama: rotary, max_position_embeddings=512
    assert proc.returncode == 0, proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "max_position_embeddings=512" in warning[0] and "rotary" in warning[0], proc.stderr


@no_cuda
def test_nccl_without_cuda_is_refused_where_the_ranks_run_here_only():
    for launcher in (["launcher=local"], ["launcher=torchrun"], ["launcher=deepspeed", "parallelism=zero2"]):
        refused(*launcher, "dist.backend=nccl", expect=("dist.backend=nccl needs CUDA", "dist.backend=auto"))
    dry_ok("launcher=slurm", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2", "dist.backend=nccl")
    dry_ok("launcher=deepspeed", "parallelism=zero2", "launcher.hosts=[gpu1]", "train.global_batch_size=16",
           "dist.backend=nccl")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_flash_attention_without_its_package_is_refused_before_launch_except_in_a_container():
    refused("model.attn_implementation=flash_attention_2", expect=("flash_attn", "model.attn_implementation=sdpa"))
    refused("launcher=slurm", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2",
            "model.attn_implementation=flash_attention_2", expect=("flash_attn",))
    dry_ok("launcher=container", "launcher.image=i", "model.attn_implementation=flash_attention_2")
    # in the container's rank, transformers' ImportError becomes the same kind of error (exit 2)
    from fft_dist.model import build_model, hf_config

    config = hf_config(ModelConfig(arch={"model_type": "llama", "hidden_size": 64, "intermediate_size": 64,
                                         "num_attention_heads": 4, **SMALL}, attn_implementation="flash_attention_2"))
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2"):
        build_model(config)


WANDB_ONLINE = ("logging.wandb.enabled=true", "logging.wandb.mode=online")


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch) -> Path:
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_online_without_an_api_key_is_refused(no_wandb_key, monkeypatch):
    refused(*WANDB_ONLINE, expect=("logging.wandb.mode=online needs a W&B API key", "wandb login", "WANDB_API_KEY",
                                   "logging.wandb.mode=offline"))
    no_wandb_key.write_text("machine example.com login u password p\n")
    refused(*WANDB_ONLINE, expect=("api.wandb.ai",))
    dry_ok("logging.wandb.enabled=true")  # offline (the default) needs no key
    dry_ok(*WANDB_ONLINE, "+launcher.env.WANDB_API_KEY=abc")
    no_wandb_key.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    dry_ok(*WANDB_ONLINE)
    no_wandb_key.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    dry_ok(*WANDB_ONLINE)
