"""Real multi-process training runs (gloo, fp32, tiny Llama): parity, accumulation, full fine-tuning, NaN."""
from __future__ import annotations

from helpers import TINY_JOB


def test_per_micro_batch_mean_would_differ(tmp_path):
    """Guard for the test above: the data really has unequal token counts per micro batch."""
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.data import GlobalBatchSampler, load_datasets
    from fft_dist.model import load_tokenizer

    cfg = to_typed(resolve(compose(list(TINY_JOB))))
    data, _, _ = load_datasets(cfg.data, load_tokenizer(cfg.model))
    sampler = GlobalBatchSampler(len(data), 4, seed=cfg.train.seed)
    counts = {data[i].loss_tokens for step in range(10) for i in sampler.global_batch(step)}
    assert len(counts) > 5, counts
