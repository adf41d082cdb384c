"""The router with larger experts, for a GPU machine that has the weights on disk.

    python -m jaxdistill route --config=experiments/router/gpu_pool.py --config.weights=/data/hf \\
        --config.data.source=jsonl --config.data.dataset=gsm8k \\
        --config.data.train_path=gsm8k/train.jsonl --config.data.test_path=gsm8k/test.jsonl

`weights` is a folder holding one Hugging Face directory (config.json + *.safetensors +
tokenizer files) per expert, named as below; nothing is downloaded. Everything else is
the default config (experiments/router/default.py): override any field as usual.
"""

import importlib.util
import pathlib

_DEFAULT = pathlib.Path(__file__).with_name("default.py")

# (expert name, directory under config.weights, system prompt)
EXPERTS = [
    ("llama3.2-3b", "Llama-3.2-3B-Instruct", "Answer concisely."),
    ("qwen2.5-3b", "Qwen2.5-3B-Instruct", "Answer concisely."),
    ("mistral-7b", "Mistral-7B-Instruct-v0.3", ""),
    ("qwen2.5-3b-careful", "Qwen2.5-3B-Instruct", "Think step by step, then give the final answer."),
]


def get_config():
    spec = importlib.util.spec_from_file_location("router_default", _DEFAULT)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    c = default.get_config()
    c.weights = "/data/hf"
    c.workdir = "runs/router/gpu_pool"
    # "{weights}" in a model path is filled in from config.weights when the run starts
    c.experts = [dict(name=name, model="{weights}/" + folder, style="chat", system=system, max_new_tokens=256)
                 for name, folder, system in EXPERTS]
    c.encoder = "{weights}/Qwen2.5-3B-Instruct"
    c.precompute.batch_size = 32
    c.precompute.t_max = 3
    c.data.train_size = 2000
    c.data.test_size = 500
    c.ppo.total_timesteps = 2_000_000
    return c
