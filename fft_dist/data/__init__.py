"""Data: local sources through `datasets`, tokenised once into memory-mapped Arrow, and the resumable sampler."""
from fft_dist.data.examples import DataError, DataStats, Example, TokenizedSplit
from fft_dist.data.pipeline import load_datasets
from fft_dist.data.sampler import GlobalBatchSampler, MixtureSampler, collate
from fft_dist.data.sources import check_data_files
from fft_dist.data.training import TrainingData, load_training_data

__all__ = ["DataError", "DataStats", "Example", "TokenizedSplit", "check_data_files", "GlobalBatchSampler",
           "MixtureSampler", "TrainingData", "collate", "load_datasets", "load_training_data"]
