"""Full fine-tuning really trains every parameter; model.path really loads the pretrained weights."""
from __future__ import annotations

import math

import torch

from helpers import TINY_JOB, TINY_TRAIN, eval_losses, train
from fft_dist.checkpoint import CheckpointReader
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.model import build_model, hf_config


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    reader = CheckpointReader(ckpt)
    out = {}
    for name, t in reader.tensors.items():
        shape = t["kinds"]["param"]["shape"]
        out[name] = reader.read(name, "param", 0, math.prod(shape)).view(shape)
    return out


def initial_weights(*overrides: str) -> dict[str, torch.Tensor]:
    cfg = to_typed(resolve(compose(list(overrides))))
    torch.manual_seed(cfg.train.seed)
    return dict(build_model(hf_config(cfg.model)).state_dict())


def test_every_parameter_changes_except_frozen(tmp_path):
    run = tmp_path / "run"
    freeze = ["model.freeze=[model.norm.weight,lm_head.weight]", "model.freeze_layers=1"]
    train(run, *TINY_JOB, *freeze, "train.max_steps=1", "train.warmup_steps=0", "checkpoint.save_final=true")
    before, after = initial_weights(*TINY_JOB), final_weights(run)
    assert set(after) == {n for n in before if "rotary" not in n}
    frozen = {n for n in after if n in ("model.norm.weight", "lm_head.weight") or n.startswith("model.layers.0.")
              or n == "model.embed_tokens.weight"}
    assert len(frozen) == 12  # 9 tensors of layer 0 + embeddings + final norm + lm_head
    for name, tensor in after.items():
        if name in frozen:
            assert torch.equal(tensor, before[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(tensor, before[name]), f"trainable {name} did not change after one step"


def test_model_path_loads_pretrained_weights(tmp_path):
    """Save an HF model with seed 7, train from it with fsdp x 2: eval loss at step 0 equals the HF model's."""
    from transformers import AutoModelForCausalLM

    from fft_dist.data import collate, load_datasets
    from fft_dist.model import load_tokenizer
    from fft_dist.loss import count_loss_tokens, token_loss_sum

    cfg = to_typed(resolve(compose(list(TINY_JOB))))
    torch.manual_seed(7)
    pretrained = build_model(hf_config(cfg.model))
    with torch.no_grad():  # make it clearly not a fresh init
        for p in pretrained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pretrained.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    proc = train(run, *TINY_TRAIN, f"model.path={tmp_path / 'hf'}", "model.tokenizer=bundled", "train.max_steps=1", "train.warmup_steps=0",
                 "eval.max_batches=0", "eval.every_steps=1")
    step0 = dict(eval_losses(run))[0]
    assert "fft-dist: hf (" in proc.stdout, "the banner names the model actually trained"
    saved = (run / "config.yaml").read_text()
    assert "name: hf" in saved and "hidden_size: 64" in saved and "tiny_llama" not in saved

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = load_tokenizer(cfg.model)
    _, evals, _ = load_datasets(cfg.data, tok)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(evals), 8):
            batch = collate(evals[i:i + 8], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(token_loss_sum(logits, batch["labels"]))
            tokens += count_loss_tokens(batch)
    assert abs(step0 - total / tokens) / (total / tokens) < 1e-5, (step0, total / tokens)
