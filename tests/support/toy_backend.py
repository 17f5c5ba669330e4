"""A backend defined outside the package, registered through the same point the built-ins use.

It is parallelism=none under another name, plus a line on stderr that proves its strategy class ran:
enough to show that one module (this) and one yaml (tests/support/toy_conf/parallelism/toy.yaml) add a backend.
"""
from __future__ import annotations

import sys

from fft_dist.strategy import Backend, register
from fft_dist.strategy.backends.none import memory
from fft_dist.strategy.single import SingleProcessStrategy

MARK = "toy backend: set up"


class ToyStrategy(SingleProcessStrategy):
    name = "toy"

    def setup(self, **kwargs) -> None:
        super().setup(**kwargs)
        print(MARK, file=sys.stderr, flush=True)


BACKEND = register(Backend(
    name="toy",
    strategy=f"{__name__}:ToyStrategy",
    memory=memory,
    comm_volume=lambda grad_accum: 0,
    single_process=True,
))
