"""The `teachers` and `prune` configs with their models swapped for tiny random ones, for tests
that check what the commands write and resume, not what the models know:

    --config=tests/configs/tiny_teachers.py:default,CHAT_DIR,GEMMA_DIR   (experiments/teachers/default.py)
    --config=tests/configs/tiny_teachers.py:pruning,CHAT_DIR             (experiments/teachers/pruning.py)

CHAT_DIR stands in for SmolLM2 (its tokenizer and chat template, conftest's `tiny_chat_model`),
GEMMA_DIR for Gemma 3 (its tokenizer and architecture, `tiny_gemma_model`).
"""

import importlib.util
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments" / "teachers"


def get_config(argument: str):
    name, chat, *gemma = argument.split(",")
    spec = importlib.util.spec_from_file_location(f"teachers_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    swap = {"smollm2-135m-instruct": chat, "gemma3-270m": gemma[0] if gemma else None}
    config.teachers = [dict(t, model=swap.get(t["model"]) or t["model"]) for t in config.teachers]
    return config
