"""Data: JSONL sources, tokenised examples with loss masks, and the resumable global-batch sampler."""
from fft_dist.data.examples import DataError, Example, check_data_files, load_datasets
from fft_dist.data.sampler import GlobalBatchSampler, collate

__all__ = ["DataError", "Example", "check_data_files", "GlobalBatchSampler", "collate", "load_datasets"]
