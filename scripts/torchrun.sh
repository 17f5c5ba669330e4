#!/usr/bin/env bash
# Run fft-dist under torchrun yourself (single node or multi-node with a c10d rendezvous).
#   NPROC=8 scripts/torchrun.sh model=llama3_8b model.path=/models/llama3-8b train.precision=bf16
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 NPROC=8 scripts/torchrun.sh ...   (on every node)
# Every rank composes the same overrides; rank 0's resolved config is broadcast and written
# to run.dir/config.yaml, so pass an explicit run.dir=... for multi-node jobs.
set -euo pipefail
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
if [ "$NNODES" -gt 1 ]; then
  rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" --rdzv-id "${RDZV_ID:-fft-dist}")
else
  rdzv=(--standalone)
fi
exec torchrun "${rdzv[@]}" --nproc_per_node "$NPROC" -m fft_dist.train "$@"
