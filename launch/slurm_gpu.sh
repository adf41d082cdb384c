#!/usr/bin/env bash
# Multi-node GPU run under SLURM: one process per node, all its GPUs in the mesh.
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh experiments/self_distill/default.py [--config.x=y ...]
# JAX reads the coordinator, process count and id from SLURM (num_processes=-1).
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=jaxdistill
set -euo pipefail
config=${1:?usage: launch/slurm_gpu.sh CONFIG [overrides...]}
shift
srun .venv/bin/python -m jaxdistill train --config="$config" \
  --config.distributed.num_processes=-1 --config.mesh.data=-1 "$@"
