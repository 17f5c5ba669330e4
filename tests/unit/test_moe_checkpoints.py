"""Mixture-of-Experts folders written by ``save_pretrained`` (one tensor per expert on disk, while transformers
5 builds fused ``mlp.experts.gate_up_proj`` [E, 2I, H]): a rank's range of the fused tensor reads only the
experts it covers, in this process. Loading and exporting them on every backend is tests/e2e/test_moe_checkpoints.py."""
from __future__ import annotations

import pytest
import torch

from fft_dist import checkpoint as ckpt
from moe_checkpoints_shared import folders


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_range_reads_only_the_experts_it_covers(folders, family):
    """HFFolderSource serves the fused [E, 2I, H] tensor from per-expert files: a rank's flat range reads only
    the experts whose rows it covers (transformers' ops on that subset), and the values are from_pretrained's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folders[family]), dtype=torch.float32)
    full = dict(model.named_parameters())
    src = ckpt.HFFolderSource(folders[family])
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert src.shape(name) == (4, 64, 64)
    read_keys: list[str] = []
    full_read = src._full
    src._full = lambda key: read_keys.append(key) or full_read(key)
    per = 64 * 64  # one expert's rows
    for start, stop, experts in [(0, 2 * per, {0, 1}), (2 * per, 4 * per, {2, 3}), (per + 5, per + 9, {1}),
                                 (per - 3, per + 3, {0, 1}), (7, 7, set())]:
        read_keys.clear()
        got = src.read(name, "param", start, stop)
        assert torch.equal(got, full[name].detach().reshape(-1)[start:stop]), (start, stop)
        assert {int(k.split(".experts.")[1].split(".")[0]) for k in read_keys} == experts, read_keys
        assert len(read_keys) == 2 * len(experts)  # gate and up (w1 and w3) of each, once
    for name, p in full.items():  # every parameter, whole: renamed (Mixtral's router) and converted
        flat = p.detach().reshape(-1)
        assert torch.equal(src.read(name, "param", 0, flat.numel()), flat), name
    name = "model.layers.0.mlp.experts.down_proj"  # a conversion that is not split by expert: read whole
    src.plan.params[name].by_expert = False
    read_keys.clear()
    assert torch.equal(src.read(name, "param", 3, 70), full[name].detach().reshape(-1)[3:70])
    assert len(read_keys) == 4
