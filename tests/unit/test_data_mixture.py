"""data.mixture: weighted sources. Proportions hold per batch, each source reshuffles per its own
epoch, each source's eval set is reported by name, bad mixtures stop before any rank starts, and a
resume mid-epoch (with packing on) gives the uninterrupted run's next batches at any world size."""
from __future__ import annotations

from collections import Counter

import pytest
from transformers import AutoTokenizer

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files
from fft_dist.data.mixture import mixture_sources
from fft_dist.data.sampler import MixtureSampler
from fft_dist.data.training import load_training_data
from fft_dist.errors import ConfigError
from fft_dist.model import BUNDLED_TOKENIZER
from data_mixture_shared import code_rows, prose_rows


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def source_of(sampler: MixtureSampler, row: int) -> int:
    return max(i for i, o in enumerate(sampler.offsets) if o <= row)


def test_every_batch_holds_each_weight_share():
    sampler = MixtureSampler([50, 300, 40], [0.6, 0.3, 0.1], 16, seed=5, names=["a", "b", "c"])
    total = Counter()
    for step in range(300):
        per_batch = Counter(source_of(sampler, r) for r in sampler.global_batch(step))
        for source, share in enumerate((0.6, 0.3, 0.1)):
            assert abs(per_batch[source] - share * 16) <= 2, (step, per_batch)
        total += per_batch
    for source, share in enumerate((0.6, 0.3, 0.1)):
        assert abs(total[source] - share * 300 * 16) <= 3, total
    assert sampler.position(300)["sources"]["a"]["samples"] == total[0]


def test_each_source_reshuffles_per_its_own_epoch():
    sampler = MixtureSampler([20, 1000], [0.5, 0.5], 8, seed=1)
    small = [r for step in range(20) for r in sampler.global_batch(step) if r < 20]  # source 0: 80 samples
    epochs = [small[i:i + 20] for i in range(0, 80, 20)]
    assert all(sorted(e) == list(range(20)) for e in epochs), "every epoch of a source is a permutation of its rows"
    assert len({tuple(e) for e in epochs}) == 4, "each epoch reshuffles"
    assert sampler.position(20)["sources"]["0"]["epoch"] == 4
    unshuffled = MixtureSampler([20, 1000], [0.5, 0.5], 8, seed=1, shuffle=False)
    assert [r for r in unshuffled.global_batch(0) if r < 20] == [0, 1, 2, 3]


def test_rows_are_a_pure_function_of_seed_and_step_at_any_world_size():
    a = MixtureSampler([30, 70], [0.8, 0.2], 8, seed=3)
    b = MixtureSampler([30, 70], [0.8, 0.2], 8, seed=3)
    assert [b.global_batch(s) for s in (9, 2, 40)] == [a.global_batch(s) for s in (9, 2, 40)]
    assert MixtureSampler([30, 70], [0.8, 0.2], 8, seed=4).global_batch(0) != a.global_batch(0)
    for world, micro in ((1, 8), (2, 2), (4, 1)):
        parts = [i for r in range(world) for mb in a.rank_micro_batches(7, rank=r, world_size=world,
                                                                        micro_batch_size=micro) for i in mb]
        assert parts == a.global_batch(7)


def test_resume_with_another_batch_size_continues_at_the_same_sample():
    before = MixtureSampler([30, 70], [0.8, 0.2], 8, seed=3)
    saved = before.position(4)  # 32 samples consumed
    after = MixtureSampler([30, 70], [0.8, 0.2], 16, seed=3)
    after.resume_at(4, saved)
    assert after.global_batch(4) == before.global_batch(4) + before.global_batch(5)
    assert after.global_batch(6) == before.global_batch(8) + before.global_batch(9)
    assert after.position(6)["samples"] == 64


def mixture_cfg(tmp_path, **extra) -> DataConfig:
    mixture = {"code": {"path": str(code_rows(tmp_path / "code.jsonl", 60)), "weight": 3},
               "prose": {"path": str(prose_rows(tmp_path / "prose.jsonl", 40)), "weight": 1, "format": "text",
                         "eval_fraction": 0.25}}
    for name, entry in extra.items():
        mixture.setdefault(name, {}).update(entry)
    return DataConfig(path=None, eval_fraction=0.1, max_length=64, mixture=mixture)


def test_sources_load_through_their_own_cache_with_named_eval_sets(tmp_path, tok):
    cfg = mixture_cfg(tmp_path)
    data = load_training_data(cfg, tok, cache_dir=tmp_path / "cache")
    assert not data.stats.reused
    assert [s.name for s in data.sources] == ["code", "prose"] and [s.share for s in data.sources] == [0.75, 0.25]
    assert [s.cfg.format for s in data.sources] == [DataFormat.prompt_completion, DataFormat.text]
    assert [(e.name, len(e.split)) for e in data.evals] == [("code", 6), ("prose", 10)]
    assert len(data.train) == 54 + 30 and data.stats.examples == 84
    assert len(list((tmp_path / "cache").iterdir())) == 2, "one cache folder per source fingerprint"
    code, prose = data.train.parts
    assert data.train.rows([55, 1, 54]) == [prose[1], code[1], prose[0]]
    assert all(e.labels == e.input_ids for e in prose), "format=text applies to that source only"
    assert load_training_data(cfg, tok, cache_dir=tmp_path / "cache").stats.reused, "a second load reuses both"


@pytest.mark.parametrize("entry, message", [
    ({"code": {"weight": 0}}, r"data\.mixture\.code\.weight=0 must be a finite number > 0"),
    ({"code": {"weight": -1}}, r"data\.mixture\.code\.weight=-1"),
    ({"code": {"weight": "lots"}}, r"data\.mixture\.code\.weight='lots' must be a number"),
    ({"cdoe": {"weight": 0.5}}, r"data\.mixture\.cdoe sets a weight but no source of that name exists \(known: code, prose\)"),
    ({"prose": {"max_length": 32}}, r"data\.mixture\.prose\.max_length: data\.max_length applies to every source"),
    ({"prose": {"wieght": 1}}, r"data\.mixture\.prose\.wieght: unknown key"),
    ({"prose": {"name": "x"}}, r"data\.mixture\.prose\.name: a source's name is its key"),
    ({"prose": {"stride": "x"}}, r"data\.mixture\.prose\.stride: Value .x. .*could not be converted"),
    ({"best": {"path": "x.jsonl", "weight": 1}}, r"data\.mixture\.best: a source name"),
])
def test_bad_mixture_entries_name_the_entry(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        mixture_sources(mixture_cfg(tmp_path, **entry))


def test_mixture_and_a_top_level_path_conflict(tmp_path):
    cfg = mixture_cfg(tmp_path)
    cfg.path = "other.jsonl"
    with pytest.raises(ConfigError, match="data.path and data.mixture are both set"):
        check_data_files(cfg)


def test_a_missing_file_names_the_source_and_the_file(tmp_path):
    cfg = mixture_cfg(tmp_path, prose={"eval_path": str(tmp_path / "gone.jsonl")})
    with pytest.raises(DataError, match=r"data\.mixture\.prose\.eval_path=.*gone\.jsonl.* does not exist"):
        check_data_files(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing column"):
        check_data_files(mixture_cfg(tmp_path, prose={"path": str(bad)}))


def test_data_report_has_a_section_per_source(tmp_path, tok):
    from fft_dist.data.report import data_report

    text = data_report(mixture_cfg(tmp_path), tok, cache_dir=tmp_path / "cache")
    assert "a mixture of 2 sources: code 75.0%, prose 25.0%" in text
    assert "== source code (data.mixture.code" in text and "== source prose (data.mixture.prose" in text
    assert text.count("train: ") == 2 and "format text" in text and "format prompt_completion" in text


def test_classification_does_not_mix(tmp_path):
    from fft_dist.config import DataConfig, DataFormat
    from fft_dist.data.mixture import mixture_sources
    from fft_dist.errors import ConfigError

    cfg = DataConfig(path=None, mixture={"a": {"path": "x.jsonl", "weight": 1.0},
                                         "b": {"path": "y.jsonl", "weight": 1.0, "format": "classification"}})
    with pytest.raises(ConfigError, match="classification does not mix .*b"):
        mixture_sources(cfg)
    with pytest.raises(ConfigError, match="classification does not mix"):
        mixture_sources(DataConfig(path=None, format=DataFormat.classification,
                                   mixture={"a": {"path": "x.jsonl", "weight": 1.0}}))
