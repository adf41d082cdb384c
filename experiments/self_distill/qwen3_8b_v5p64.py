"""Self-distillation of Qwen3-8B on GSM8K, a TPU v5p-64 slice (32 chips of 95 GB, 8 hosts).

    launch/tpu_pod.sh my-v5p-64 us-east5-a experiments/self_distill/qwen3_8b_v5p64.py \
        --config.model=/data/Qwen3-8B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

Weights and data are the user's and must be on every host at the same path (or a mounted
bucket); nothing downloads.

Memory per chip (mesh fsdp=32, all within the slice's ICI; `mesh.bytes_per_device` computes
the first line, and tests/test_launch.py checks it):
- parameters 0.51 GB (8.19B in bfloat16, split 32 ways), gradients 0.51 GB, AdamW moments
  2 x 0.51 GB: 2.05 GB of state;
- activations with remat: 2 rows x 2,560 tokens x 4,096 x 2 bytes x 36 layers = 1.5 GB, plus
  one block's recomputation and one logits chunk at a time;
- rollouts: 147 KB of KV cache per token; 32 problems x 2,560 tokens = 12 GB, today on every
  chip (generate decodes replicated rows), the largest item.
About 20 of the 95 GB.

What to expect: see qwen3_8b_gpu8.py.
"""

import importlib.util
from pathlib import Path


def get_config():
    spec = importlib.util.spec_from_file_location("gpu8", Path(__file__).with_name("qwen3_8b_gpu8.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir = "runs/self_distill/qwen3_8b_v5p64"
    c.batch_size = 32  # a multiple of the 32 data-parallel chips
    c.sample.max_new_tokens = 2048
    c.eval.max_new_tokens = 2048
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 32, 1
    c.attention = "splash"  # Pallas, in shard_map over the batch; the compile lowers the real Mosaic kernel
    c.compile.target = "v5p:4x4x2"  # v5p-64: 32 chips
    return c
