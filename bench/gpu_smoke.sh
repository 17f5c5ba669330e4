#!/usr/bin/env bash
# The GPU smoke run in one command: bench/gpu_smoke.sh [--budget-s 290] [--steps 20] [--no-record]
# Runs bench/gpu_smoke.py with this checkout's Python ($PYTHON, else the active `python`); see its
# docstring for what runs on one GPU and on two or more. Exit codes: 0 every job passed, 1 a job
# failed or ran out of time, 2 a bad option, 77 no CUDA GPU visible (nothing was run).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
exec "${PYTHON:-python}" bench/gpu_smoke.py "$@"
