"""data.packing: packed rows give every example exactly the loss it has alone (no attention across
examples, positions restarting per example), and training with packing keeps backend parity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_JOB, assert_close_rel
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.data import collate, load_datasets
from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.data.packing import pack_batch
from fft_dist.model import build_model, hf_config, load_tokenizer
from fft_dist.strategy.base import model_inputs
from data_packing_shared import short_rows


def per_token_loss(logits, labels):
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().transpose(1, 2), next_labels, ignore_index=IGNORE_INDEX, reduction="none")


def test_pack_batch_restarts_positions_and_hides_boundaries():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[1, 2, 3], [-100, 5], [6, 7, 8, 9]],
             "loss_tokens": [2, 1, 3]}
    out = pack_batch(batch, max_length=6)
    assert out["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    assert out["labels"] == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9]], "no example predicts the next one's start"
    assert out["loss_tokens"] == [3, 3]


def test_packed_per_example_losses_equal_unpacked(tmp_path):
    data = short_rows(tmp_path / "d.jsonl")
    cfg = to_typed(resolve(compose([*TINY_JOB, f"data.path={data}", "data.eval_fraction=0"])))
    tok = load_tokenizer(cfg.model)
    plain, _, _ = load_datasets(cfg.data, tok, cache_dir=tmp_path)
    cfg.data.packing = True
    packed, _, stats = load_datasets(cfg.data, tok, cache_dir=tmp_path)
    assert stats.packed_rows == len(packed) < 0.7 * len(plain), "several examples per row"
    torch.manual_seed(0)
    model = build_model(hf_config(cfg.model)).eval()
    alone = []
    with torch.no_grad():
        for ex in plain:
            b = collate([ex], tok.pad_token_id)
            alone.append(float(per_token_loss(model(**model_inputs(b["input_ids"], b["attention_mask"], None,
                                                                  torch.device("cpu"))).logits, b["labels"]).sum()))
        together, unmasked = [], []
        for start in range(0, len(packed), 4):
            b = collate(packed[start:start + 4], tok.pad_token_id)
            assert "position_ids" in b
            losses = per_token_loss(model(**model_inputs(b["input_ids"], b["attention_mask"], b["position_ids"],
                                                         torch.device("cpu"))).logits, b["labels"])
            leaky = per_token_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   b["labels"])
            for row in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][row].sum())
                starts = (b["position_ids"][row, :n] == 0).nonzero().flatten().tolist() + [n]
                for a, z in zip(starts, starts[1:]):
                    # the loss of token t+1 sits at position t: an example's losses are positions a..z-2
                    together.append(float(losses[row, a:z - 1].sum()))
                    unmasked.append(float(leaky[row, a:z - 1].sum()))
    assert len(together) == len(alone)
    assert_close_rel(together, alone, 1e-5, "packed vs alone")
    with pytest.raises(AssertionError):
        assert_close_rel(unmasked, alone, 1e-5, "a plain causal mask over the packed row leaks across examples")


def test_report_shows_packing_efficiency(tmp_path):
    from fft_dist.data.report import data_report

    cfg = to_typed(resolve(compose([*TINY_JOB, f"data.path={short_rows(tmp_path / 'd.jsonl')}", "data.packing=true"])))
    text = data_report(cfg.data, load_tokenizer(cfg.model), cache_dir=tmp_path / "cache")
    assert "efficiency)" in text and "first packed example" in text
