"""Self-distillation of Qwen3-8B on GSM8K, one node of 8 GPUs (H100 80 GB), fully sharded.

    bash scripts/setup.sh --accelerator gpu
    sbatch --nodes=1 --gpus-per-node=8 launch/slurm_gpu.sh experiments/self_distill/qwen3_8b_gpu8.py \
        --config.model=/data/Qwen3-8B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

Weights and data are the user's (a Hugging Face directory and GSM8K JSONL); nothing downloads.

Memory per GPU: every program of the job (train step, rollout prefill and decode, held-out
decoding and scoring) compiled for h100:8 on a CPU host, with no weights:

    python -m jaxdistill compile --config=experiments/self_distill/qwen3_8b_gpu8.py --config.model=qwen3-8b

docs/scale.md has the numbers (from docs/scale/compile/, which tests/test_launch.py checks):
parameters, gradients and AdamW moments split 8 ways (fsdp), activations with remat, the
KV cache split over the batch. The launch script's --dry-run runs the same compile.

What to expect: OPSD (on-policy self-distillation with privileged information) reports
Qwen3-1.7B on AIME24 going from 47.7 to 51.7; at 8B on GSM8K the base model is already
strong (~90%), so the method's effect is best read on held-out accuracy per generated token
and on mean@k. At 135M the method loses to SFT (docs/results.md).
"""

from jaxdistill import settings


def get_config():
    c = settings.sibling_config(__file__, "default.py")
    c.model = ""  # required: a Hugging Face directory with Qwen3-8B (config.json + *.safetensors)
    c.dtype = "bfloat16"
    c.remat = True
    c.attention = "cudnn"  # not yet run on a GPU here (docs/scale.md); "flash" is the portable fallback
    c.workdir = "runs/self_distill/qwen3_8b_gpu8"
    c.steps = 200
    c.batch_size = 16  # problems per update: a multiple of the 8 data-parallel GPUs
    c.sample.max_new_tokens = 1024
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.data.source = "jsonl"
    c.data.eval_size = 256
    c.eval.max_new_tokens = 1024
    c.eval.batch_size = 64
    c.checkpoint.every = 25
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.distributed.num_processes = -1  # set by launch/slurm_gpu.sh; JAX reads the rest from SLURM
    c.compile.prompt_tokens = 512  # GSM8K prompts with the reference solution as the hint
    c.compile.target = "h100:8"  # what `python -m jaxdistill compile` and the launch script's --dry-run check
    return c
