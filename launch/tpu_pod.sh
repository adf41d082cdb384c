#!/usr/bin/env bash
# TPU pod slice: set up and run the same command on every worker; JAX discovers the slice.
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/self_distill/qwen3_8b_v5p64.py --config.model=/data/Qwen3-8B ...
#   launch/tpu_pod.sh --dry-run TPU_NAME ZONE CONFIG ...     # print the gcloud command, then compile every
#       program of the job for the preset's topology (compile.target) here, on the CPU, without weights,
#       and fail if one does not fit (libtpu comes with the test extras; --config.model may be a shape name)
# The repository must be at ~/jaxdistill on every worker (git clone or
# `gcloud compute tpus tpu-vm scp --recurse --worker=all`). scripts/setup.sh installs the TPU
# build of jax inside .venv and stops with the exact apt command if Python 3.11 is missing
# (TPU VM images ship 3.10). The mesh comes from the config; nothing here overrides it.
set -euo pipefail
dry=""
[ "${1:-}" = "--dry-run" ] && { dry=echo; shift; }
name=${1:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG [overrides...]}
zone=${2:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG [overrides...]}
config=${3:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG [overrides...]}
shift 3
overrides=""
[ $# -eq 0 ] || overrides=$(printf ' %q' "$@")
remote="cd ~/jaxdistill && bash scripts/setup.sh --accelerator tpu && \
JAX_COMPILATION_CACHE_DIR=\$HOME/jaxdistill/.cache/jax .venv/bin/python -m jaxdistill train --config=$config \
--config.distributed.num_processes=-1$overrides"
if [ -n "$dry" ]; then
  echo gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
  exec env JAX_PLATFORMS=cpu .venv/bin/python -m jaxdistill compile --config="$config" "$@"
fi
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
