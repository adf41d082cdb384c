"""Self-distillation of Qwen3-8B on GSM8K, a TPU v5p-64 slice (32 chips of 95 GB, 8 hosts).

    launch/tpu_pod.sh my-v5p-64 us-east5-a experiments/self_distill/qwen3_8b_v5p64.py \
        --config.model=/data/Qwen3-8B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

Weights and data are the user's and must be on every host at the same path (or a mounted
bucket); nothing downloads.

Memory per chip: every program of the job compiled for v5p:4x4x2 on a CPU host, with no weights:

    python -m jaxdistill compile --config=experiments/self_distill/qwen3_8b_v5p64.py --config.model=qwen3-8b

docs/scale.md has the numbers (from docs/scale/compile/, which tests/test_launch.py checks).

What to expect: see qwen3_8b_gpu8.py.
"""

from jaxdistill import settings


def get_config():
    c = settings.sibling_config(__file__, "qwen3_8b_gpu8.py")
    c.workdir = "runs/self_distill/qwen3_8b_v5p64"
    c.batch_size = 32  # a multiple of the 32 data-parallel chips
    c.sample.max_new_tokens = 2048
    c.eval.max_new_tokens = 2048
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 32, 1
    c.attention = "splash"  # Pallas, in shard_map over the batch; the compile lowers the real Mosaic kernel
    c.compile.target = "v5p:4x4x2"  # v5p-64: 32 chips
    return c
