"""Self-distillation of Qwen3-1.7B on GSM8K, one GPU (H100 80 GB): the published OPSD model size.

    bash scripts/setup.sh --accelerator gpu
    python -m jaxdistill train --config=experiments/self_distill/qwen3_1p7b_gpu1.py \
        --config.model=/data/Qwen3-1.7B --config.data.train_path=/data/gsm8k_train.jsonl \
        --config.data.eval_path=/data/gsm8k_test.jsonl

Weights and data are the user's (a Hugging Face directory and GSM8K JSONL); nothing downloads.

Memory per GPU: every program of the job compiled for h100:1 on a CPU host, with no weights:

    python -m jaxdistill compile --config=experiments/self_distill/qwen3_1p7b_gpu1.py --config.model=qwen3-1.7b

docs/scale.md has the numbers (from docs/scale/compile/, which tests/test_launch.py checks).

What to expect: OPSD (on-policy self-distillation with privileged information) reports
Qwen3-1.7B on AIME24 going from 47.7 to 51.7, with competition problems and generations far
longer than 1,024 tokens. On GSM8K the base model is already strong, so read the effect as the
change in held-out accuracy (and generated length) against the `sft` arm on the same budget,
over 3 seeds. At 135M the method loses to SFT (docs/results.md); whether the sign flips between
135M and 1.7B is the open question this config answers.
"""

from jaxdistill import settings


def get_config():
    c = settings.sibling_config(__file__, "qwen3_8b_gpu8.py")
    c.model = ""  # required: a Hugging Face directory with Qwen3-1.7B (config.json + *.safetensors)
    c.workdir = "runs/self_distill/qwen3_1p7b_gpu1"
    c.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.distributed.num_processes = 1  # one process, no jax.distributed
    c.compile.target = "h100:1"
    return c
