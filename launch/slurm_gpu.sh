#!/usr/bin/env bash
# Multi-node GPU run under SLURM: one process per node, driving all of that node's GPUs.
#   bash scripts/setup.sh --accelerator gpu      # once, on the shared filesystem
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh experiments/self_distill/qwen3_8b_gpu8.py \
#       --config.model=/data/Qwen3-8B [--config.x=y ...]
#   SLURM_GPUS_ON_NODE=8 bash launch/slurm_gpu.sh --dry-run CONFIG ...   # print the command, then compile
#       every program of the job for the preset's GPUs (compile.target) here, without GPUs or weights,
#       and fail if one does not fit (needs jax's CUDA build in .venv; --config.model may be a shape name)
# JAX reads the coordinator, the process count and this process's id from SLURM
# (num_processes=-1). Its SLURM detection assumes one process per GPU and would give each
# process only GPU $SLURM_LOCALID, so local_device_ids hands this node's process all of them.
# The mesh comes from the config (the presets size it for the model); nothing here overrides it.
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=jaxdistill
set -euo pipefail
dry=""
[ "${1:-}" = "--dry-run" ] && { dry=echo; shift; }
config=${1:?usage: launch/slurm_gpu.sh [--dry-run] CONFIG [overrides...]}
shift
gpus=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
if [ "$gpus" -lt 1 ]; then
  echo "slurm_gpu.sh: no GPUs on this node (SLURM_GPUS_ON_NODE is unset and nvidia-smi lists none);" \
       "submit with --gpus-per-node=N" >&2
  exit 1
fi
[ -x .venv/bin/python ] || [ -n "$dry" ] || { echo "slurm_gpu.sh: run bash scripts/setup.sh --accelerator gpu first" >&2; exit 1; }
ids=$(seq -s, 0 $((gpus - 1)))
# Compiled programs persist across jobs (the first step of an 8B model compiles for minutes).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}
# JAX takes 75% of each GPU unless told otherwise; the compiled memory reports assume 95%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [ -n "$dry" ]; then
  echo srun --ntasks-per-node=1 .venv/bin/python -m jaxdistill train --config="$config" \
    --config.distributed.num_processes=-1 --config.distributed.local_device_ids="$ids" "$@"
  exec env JAX_PLATFORMS=cpu .venv/bin/python -m jaxdistill compile --config="$config" "$@"
fi
srun --ntasks-per-node=1 .venv/bin/python -m jaxdistill train --config="$config" \
  --config.distributed.num_processes=-1 --config.distributed.local_device_ids="$ids" "$@"
