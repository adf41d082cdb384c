"""Self-distillation of Qwen3-32B on GSM8K, one node of 8 H200 GPUs (141 GB each), fully sharded.

    python -m jaxdistill compile --config=experiments/self_distill/qwen3_32b_h200x8.py --config.model=qwen3-32b
    sbatch --nodes=1 --gpus-per-node=8 launch/slurm_gpu.sh experiments/self_distill/qwen3_32b_h200x8.py \
        --config.model=/data/Qwen3-32B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

32.8B parameters in bfloat16 with gradients and AdamW moments are 262 GB: 33 GB per GPU over
fsdp=8, before activations, rollouts and evaluation. Per-GPU memory of every program, compiled
for h200:8 on a CPU host: see docs/scale.md.
"""

from jaxdistill import settings


def get_config():
    c = settings.sibling_config(__file__, "qwen3_8b_gpu8.py")
    c.workdir = "runs/self_distill/qwen3_32b_h200x8"
    c.batch_size = 16
    c.eval.batch_size = 32
    c.compile.target = "h200:8"
    return c
