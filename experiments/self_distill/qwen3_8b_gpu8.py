"""Self-distillation of Qwen3-8B on GSM8K, one node of 8 GPUs (H100 80 GB), fully sharded.

    bash scripts/setup.sh --accelerator gpu
    sbatch --nodes=1 --gpus-per-node=8 launch/slurm_gpu.sh experiments/self_distill/qwen3_8b_gpu8.py \
        --config.model=/data/Qwen3-8B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

Weights and data are the user's (a Hugging Face directory and GSM8K JSONL); nothing downloads.

Memory per GPU (mesh fsdp=8; `mesh.bytes_per_device` computes the first line, and
tests/test_launch.py checks it):
- parameters 2.05 GB (8.19B in bfloat16, split 8 ways), gradients 2.05 GB, AdamW moments
  2 x 2.05 GB (they take the parameters' dtype): 8.2 GB of state;
- activations with remat (each block's input kept): 4 rows x 1,536 tokens x 4,096 x 2 bytes x
  36 layers = 1.8 GB, plus one block's recomputation and one 64-position logits chunk
  (4 x 64 x 151,936 floats) at a time: a few GB;
- rollouts: a KV cache of 147 KB per token (36 layers x 2 x 8 heads x 128 x 2 bytes); 16
  problems x 1,536 tokens = 3.6 GB, today on every GPU (generate decodes replicated rows).
About 20 of the 80 GB, leaving room for longer genCoT or larger batches.

What to expect: OPSD (on-policy self-distillation with privileged information) reports
Qwen3-1.7B on AIME24 going from 47.7 to 51.7; at 8B on GSM8K the base model is already
strong (~90%), so the method's effect is best read on held-out accuracy per generated token
and on mean@k. At 135M the method loses to SFT (docs/results.md).
"""

import importlib.util
from pathlib import Path


def _default():
    spec = importlib.util.spec_from_file_location("default", Path(__file__).with_name("default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _default()
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
    c.compile.target = "h100:8"  # what `python -m jaxdistill compile` and the launch script's --dry-run check
    return c
