"""Long-context self-distillation of Qwen3-8B: 8,192 generated tokens per sample, TPU v5p-64.

    python -m jaxdistill compile --config=experiments/self_distill/qwen3_8b_8k_v5p64.py --config.model=qwen3-8b
    launch/tpu_pod.sh my-v5p-64 us-east5-a experiments/self_distill/qwen3_8b_8k_v5p64.py \
        --config.model=/data/Qwen3-8B --config.data.train_path=/data/competition_train.jsonl \
        --config.data.eval_path=/data/competition_test.jsonl

Competition problems (OPSD's AIME setting) need reasoning traces far past GSM8K's. Dense
attention scores for 8k tokens would take [rows, heads, T, T] floats per layer; splash keeps
memory linear in length, and remat keeps one block's activations. Per-chip memory of every
program, compiled for v5p:4x4x2 on a CPU host: see docs/scale.md.
"""

from jaxdistill import settings


def get_config():
    c = settings.sibling_config(__file__, "qwen3_8b_v5p64.py")
    c.workdir = "runs/self_distill/qwen3_8b_8k_v5p64"
    c.sample.max_new_tokens = 8192
    c.eval.max_new_tokens = 8192
    c.eval.batch_size = 32
    c.attention = "splash"  # needed: dense attention at 8k is quadratic
    return c
