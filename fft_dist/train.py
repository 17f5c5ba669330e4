"""Worker entry point: `python -m fft_dist.train [overrides]`, what torchrun / deepspeed start per rank.

The stop-signal handler is installed before anything heavy is imported, so a signal during
start-up is never a traceback. The rank's work is :func:`fft_dist.rank.run_worker`.
"""
from __future__ import annotations

import sys

from fft_dist.preemption import StopSignal


def main(argv: list[str] | None = None) -> None:
    stop = StopSignal()
    from fft_dist.dist import exit_rank
    from fft_dist.launch import strip_launcher_args
    from fft_dist.rank import run_worker

    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    exit_rank(run_worker(argv, stop=stop))


if __name__ == "__main__":
    main()
