"""Hydra multirun: `fft-dist train -m a=1,2` runs every point, each in its own run directory."""
from __future__ import annotations

from fft_dist.sweep import points


def test_points_are_the_product_of_the_sweeps_in_hydra_grammar():
    got = points(["train.lr=1e-3,2e-3", "model=tiny_llama", "train.seed=range(1,3)"])
    assert got == [["train.lr=0.001", "model=tiny_llama", "train.seed=1"],
                   ["train.lr=0.001", "model=tiny_llama", "train.seed=2"],
                   ["train.lr=0.002", "model=tiny_llama", "train.seed=1"],
                   ["train.lr=0.002", "model=tiny_llama", "train.seed=2"]]
