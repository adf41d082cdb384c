"""Self-distillation of Qwen3-32B on GSM8K, a TPU v5p-128 slice (64 chips of 95 GB, 16 hosts).

    python -m jaxdistill compile --config=experiments/self_distill/qwen3_32b_v5p128.py --config.model=qwen3-32b
    launch/tpu_pod.sh my-v5p-128 us-east5-a experiments/self_distill/qwen3_32b_v5p128.py \
        --config.model=gs://my-bucket/Qwen3-32B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

The published method helps from about 4-8B on; 32B is where users with a pod slice live.
Parameters, gradients and AdamW moments are split 64 ways (fsdp), the batch too; attention is
Pallas splash. Per-chip memory of every program, compiled for v5p:4x4x4 on a CPU host: see
docs/scale.md (the numbers come from the compiled programs, not from an estimate).
"""

from jaxdistill import settings


def get_config():
    c = settings.sibling_config(__file__, "qwen3_8b_v5p64.py")
    c.workdir = "runs/self_distill/qwen3_32b_v5p128"
    c.batch_size = 64  # a multiple of the 64 data-parallel chips
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 64, 1
    c.compile.target = "v5p:4x4x4"  # v5p-128: 64 chips
    return c
