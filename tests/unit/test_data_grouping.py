"""data.group_by_length: each run of N rows of an epoch's shuffle is sorted by length, so micro
batches pad less; the order stays a pure function of (seed, step) and survives a resume at
another batch size; packing and mixtures refuse it."""
from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import GlobalBatchSampler, check_data_files
from fft_dist.data.training import load_training_data
from fft_dist.errors import ConfigError
from fft_dist.model import BUNDLED_TOKENIZER

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(5, 200) for _ in range(400)]


def padded_slots(sampler, steps: int, micro: int) -> int:
    slots = 0
    for step in range(steps):
        for mb in sampler.rank_micro_batches(step, rank=0, world_size=1, micro_batch_size=micro):
            slots += max(LENGTHS[i] for i in mb) * len(mb)
    return slots


def test_groups_are_sorted_permutations_that_pad_less():
    plain = GlobalBatchSampler(400, 16, seed=2)
    grouped = GlobalBatchSampler(400, 16, seed=2, lengths=LENGTHS, group_by_length=128)
    order = [i for s in range(25) for i in grouped.global_batch(s)]
    assert sorted(order) == list(range(400)), "an epoch still uses every row once"
    for start in range(0, 384, 128):
        assert [LENGTHS[i] for i in order[start:start + 128]] == sorted((LENGTHS[i] for i in order[start:start + 128]),
                                                                        reverse=True)
    assert set(order[:128]) == {i for s in range(8) for i in plain.global_batch(s)}, "grouping only reorders a run"
    assert padded_slots(grouped, 25, 4) < 0.8 * padded_slots(plain, 25, 4)
    assert grouped.global_batch(25) != grouped.global_batch(0), "the next epoch is a new shuffle"
    again = GlobalBatchSampler(400, 16, seed=2, lengths=LENGTHS, group_by_length=128)
    assert again.global_batch(30) == grouped.global_batch(30), "a pure function of (seed, step)"


def test_resume_at_another_batch_size_keeps_the_grouped_order():
    before = GlobalBatchSampler(400, 16, seed=2, lengths=LENGTHS, group_by_length=128)
    after = GlobalBatchSampler(400, 32, seed=2, lengths=LENGTHS, group_by_length=128)
    after.resume_at(3, before.position(3))
    assert after.global_batch(3) == before.global_batch(3) + before.global_batch(4)


def test_config_wires_lengths_and_refuses_packing_and_mixtures(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (1 + i % 37)}) + "\n" for i in range(64)))
    cfg = DataConfig(path=str(data), format=DataFormat.text, eval_fraction=0.0, group_by_length=32)
    loaded = load_training_data(cfg, tok, cache_dir=tmp_path / "cache")
    sampler = loaded.sampler(8, seed=0)
    lengths = [len(e.input_ids) for e in loaded.train]
    assert list(sampler.lengths) == lengths
    first = [lengths[i] for s in range(4) for i in sampler.global_batch(s)]
    assert first == sorted(first, reverse=True)
    with pytest.raises(ConfigError, match="data.group_by_length applies to unpacked rows only"):
        check_data_files(DataConfig(path=str(data), format=DataFormat.text, packing=True, group_by_length=32))
    mixed = DataConfig(path=None, group_by_length=32, mixture={"a": {"path": str(data), "weight": 1}})
    with pytest.raises(ConfigError, match="data.group_by_length does not apply to data.mixture"):
        check_data_files(mixed)
