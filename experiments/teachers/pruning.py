"""Learned pruning of the branch search (PPO) against the heuristic pruner, at equal tokens.

    python -m jaxdistill prune --config=experiments/teachers/pruning.py
    python -m jaxdistill prune --config=experiments/teachers/pruning.py:runs/grid/sft-s0   # + the fine-tuned teacher

The stack searches each of the first `pruning.problems` training problems (never the held-out
ones the teachers are evaluated on: the command refuses an overlap) once, with no
pruning (right 2, wrong 1, two branching levels: up to 9 leaves), and keeps the complete
tree (saved per problem; a rerun reads them back). PPO policies, one per token price alpha
and seed, learn on the first `train_problems` trees to expand, continue or prune at each
pause; they and the heuristic (prune below a mean top probability, swept; its threshold
chosen on the same training trees, per price) are replayed on the remaining trees, which no
setting has seen. The teachers are the two SmolLM2 styles (one vmapped forward), plus the
SmolLM2 copy fine-tuned by the SFT arm when its work directory is given: see
jaxdistill/teachers/pruning.py and docs/teachers.md.
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("teachers_default", Path(__file__).with_name("default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config(finetuned: str = ""):
    c = _default.get_config(finetuned)
    c.workdir = "runs/teachers/pruning" + ("-finetuned" if finetuned else "")
    c.teachers = [t for t in c.teachers if t["model"] != "gemma3-270m"]  # one architecture: one forward
    c.search.update(dict(right=2, wrong=1, max_levels=2, branch_entropy=1.0, gap=6, max_new_tokens=96))
    c.pruning = ml_collections.ConfigDict(dict(
        problems=32, train_problems=16, seed=0, seeds=3,
        # the baseline: independent samples from one teacher with each held-out tree's tokens
        best_of_n_teacher="smollm2-sft-chat" if finetuned else "smollm2-chat",
        alphas=(0.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0),  # gold traces given up per 1,000 tokens
        thresholds=(0.0, *(round(0.5 + 0.02 * i, 2) for i in range(24)), 1.01),  # heuristic: 0.5 ... 0.96
        ppo=dict(num_envs=64, num_steps=16, total_timesteps=500_000, update_epochs=4, num_minibatches=4,
                 discount=1.0, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
                 lr=1e-3, anneal_lr=True, hidden=(64, 64))))
    return c
