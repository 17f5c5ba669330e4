"""FSDP2 strategy specifics that the parity tests cannot see (one gloo rank in a child process, ~10 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO


# After a training forward: which parameters are still gathered (plain tensors) and which were
# resharded (DTensors) before backward.
SCRIPT = r"""
import json, sys
import torch
from torch.distributed.tensor import DTensor
from fft_dist.config import FFTConfig, Parallelism, batch_plan
from fft_dist.dist import destroy, init_distributed
from fft_dist.model import build_model, hf_config
from fft_dist.optim import optimizer_factory
from fft_dist.strategy import make_strategy

cfg = FFTConfig()
cfg.parallelism.name = Parallelism.fsdp
cfg.parallelism.reshard_after_forward = sys.argv[1] == "true"
cfg.model.arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}
ctx = init_distributed("gloo", 60)
strategy = make_strategy(cfg, batch_plan(cfg.train, 1), ctx)
strategy.setup(build_model=lambda: build_model(hf_config(cfg.model)),
               make_optimizer=optimizer_factory(cfg.optimizer, 1e-3), lr_at=lambda step: 1e-3)
strategy.train(True)
ids = torch.randint(0, 64, (2, 8))
logits = strategy.forward(ids, torch.ones_like(ids)).logits
model = strategy.model
out = {"root": not isinstance(model.lm_head.weight, DTensor),
       "layer": not isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor),
       "reduce_dtype": str(model._get_fsdp_state()._mp_policy.reduce_dtype)}
strategy.backward(logits.float().sum())
strategy.step(0)
with torch.no_grad():  # evaluation: nothing may stay gathered, the fragments must be the shards
    strategy.forward(ids, torch.ones_like(ids))
out["after_eval"] = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
print(json.dumps(out))
destroy()
"""


def gathered_after_forward(reshard: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # no rank variables: tests/conftest.py keeps them out of pytest
    proc = subprocess.run([sys.executable, "-c", SCRIPT, reshard], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_root_stays_gathered_and_layers_follow_reshard_after_forward():
    """The root (embeddings, norm, lm_head) keeps FSDP2's root default, whatever the per-layer setting:
    resharding it after forward would all-gather it again at the start of backward. After an
    evaluation forward (no backward follows) everything is sharded again, as checkpoints need. The
    mixed-precision policy states its fp32 gradient reduction (issue 17), in fp32 too."""
    fp32 = {"reduce_dtype": "torch.float32"}
    assert gathered_after_forward("true") == {"root": True, "layer": False, "after_eval": [], **fp32}
    assert gathered_after_forward("false") == {"root": True, "layer": True, "after_eval": [], **fp32}
