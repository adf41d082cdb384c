"""Teacher stack on the offline models: single teachers vs aggregation rules, diversity, branch search.

    python -m jaxdistill teachers --config=experiments/teachers/default.py
    python -m jaxdistill teachers --config=experiments/teachers/default.py --config.data.eval_size=64 \
        --config.pivot=gemma3-270m --config.search.problems=0

Three teachers (SmolLM2-135M-Instruct with its chat template, the same model few-shot,
Gemma 3 270M few-shot: another architecture and a 262k vocabulary) decode held-out
synthetic word problems in lockstep, in the pivot vocabulary (default SmolLM2's; Gemma's
is the ablation, see docs/teachers.md). Arms: each teacher
alone (in its own vocabulary), the weighted mixture, the product of experts, the confidence
gate on the lead teacher, per-prompt perplexity weights and online weights from verified
accuracy on training problems. Diversity (pairwise Jensen-Shannon, top-1 agreement, mixture entropy
gain) is measured on the reference solutions. Branch search runs on `search.problems` training
problems and writes gold traces (traces.jsonl, readable by the self-distillation loader)
and located negatives (negatives.jsonl, preference pairs), against best-of-N sampling from
the best single teacher at equal generated tokens over `seeds` seeds. Decoding is greedy by
default, so one seed is exact for the arms; with temperature > 0 every arm runs `seeds`
times. Finished arms and searched problems are saved, so an interrupted run resumes.
A fourth teacher, a SmolLM2 copy fine-tuned by this project (SFT on the training split's
reference solutions), joins with the config argument: produce it once (about 10 minutes),
then name its work directory; it stacks with the base SmolLM2 on the teacher axis.

    python experiments/self_distill/grid.py --arms=sft --seeds=0     # -> runs/grid/sft-s0
    python -m jaxdistill teachers --config=experiments/teachers/default.py:runs/grid/sft-s0

On a 2-core CPU the arms and the diversity pass take about 20 minutes. The branch search
compiles once per live-branch bucket (about 3 minutes for the first problem), so the default
searches 2 problems; --config.search.problems=0 skips it.
"""

import ml_collections


def teacher(name, model, style="chat", **kw):
    return dict(name=name, model=model, style=style, **kw)


def get_config(finetuned: str = ""):
    """`finetuned`: the work directory of a finished self-distill training run (e.g. the SFT arm's)."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/teachers/default" if not finetuned else "runs/teachers/with-finetuned"
    c.teachers = [
        teacher("smollm2-chat", "smollm2-135m-instruct"),
        teacher("smollm2-fewshot", "smollm2-135m-instruct", "fewshot"),
        teacher("gemma3-fewshot", "gemma3-270m", "fewshot"),
    ] + ([teacher("smollm2-sft-chat", finetuned)] if finetuned else [])
    # The vocabulary the stack decodes in: a teacher's model ("" = the first teacher's, SmolLM2, the student's
    # in this project). gemma3-270m (the larger vocabulary) keeps every stream closer to its own tokenisation
    # but measured lower (docs/teachers.md).
    c.pivot = ""
    # "": a rerun continues this workdir only under the same results-changing settings (config.json holds them);
    # "ignore_config_changes": continue it anyway (more steps, say), recorded in the summary
    c.resume = ""
    # TensorBoard event files go to workdir/tensorboard/ always; wandb=PROJECT also logs to Weights & Biases
    c.log = dict(wandb="")
    c.width = 2  # teacher tokens fed per pivot token; pivot tokens needing more are not candidates (counted)
    # True: a few-shot teacher's end of reply (a blank line; a line break after '#### N') counts as the end of
    # turn. Off in the measured runs: there the final-answer line stops a branch anyway (docs/teachers.md).
    c.fewshot_ends_turn = False
    c.rules = ("mean_probs", "mean_logprobs", "gated", "perplexity", "online")
    c.gate_threshold = 0.5  # gated: the lead (first) teacher alone while its top probability is >= this
    c.perplexity_temperature = 1.0  # perplexity: w ∝ exp(-nll per byte of the problem / temperature)
    c.online_temperature = 0.1  # online: w ∝ exp(verified accuracy on the fitting problems / temperature)
    # training problems (never held-out ones) whose verified answers fit the online weights and pick the
    # teacher best-of-N samples from
    c.online_problems = 16
    c.top_k = 10  # candidates: union of each teacher's top-k (0: every token)
    c.temperature = 0.0  # 0: greedy
    c.seeds = 3  # used when temperature > 0
    c.max_new_tokens = 96
    c.batch_size = 16
    c.dtype = "float32"
    # Branch search on `problems` training problems (its traces are training data), against best-of-N
    # sampling from the best single teacher (on the fitting problems) at the same generated tokens (seeds x).
    c.search = ml_collections.ConfigDict(dict(
        problems=2, rule="mean_probs", right=2, wrong=2, branch_entropy=1.0, gap=6, max_levels=3, max_live=16,
        min_confidence=0.0, token_budget=768, max_new_tokens=96, baseline_temperature=0.7,
        trace_top=20))  # gold traces carry the stack's top-20 distribution per token (0: off)
    # task: "math" (synthetic word problems) or "qa" (synthetic questions of four families, data/qa.py)
    c.data = ml_collections.ConfigDict(dict(task="math", seed=0, eval_size=32, fewshot_examples=2, steps=1,
                                            max_start=20, max_operand=12))
    return c
