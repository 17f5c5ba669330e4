#!/usr/bin/env bash
# Run fft-dist under the DeepSpeed launcher. It appends --local_rank=N, which fft-dist strips.
#   NUM_GPUS=8 scripts/deepspeed.sh parallelism=zero3 model=llama3_8b model.path=/models/llama3-8b
#   HOSTFILE=scripts/hostfile.example scripts/deepspeed.sh parallelism=zero3 ...   (multi-node, passwordless ssh)
# On CPU: NUM_GPUS=2 DS_ACCELERATOR=cpu scripts/deepspeed.sh parallelism=zero2
set -euo pipefail
args=(--num_gpus "${NUM_GPUS:-2}")
if [ -n "${HOSTFILE:-}" ]; then args=(--hostfile "$HOSTFILE"); fi
exec deepspeed "${args[@]}" --module fft_dist.train "$@"
