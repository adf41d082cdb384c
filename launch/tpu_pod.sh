#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; JAX discovers the pod itself.
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/self_distill/default.py [--config.x=y ...]
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}
shift 3
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd ~/jaxdistill && bash scripts/setup.sh && pip install -q 'jax[tpu]<0.11.1' &&
  .venv/bin/python -m jaxdistill train --config=$config --config.distributed.num_processes=-1 \
    --config.mesh.data=-1 $*"
