"""Does the hint's content reach the self-teacher's target? The untrained model, one pass, no training.

    python experiments/self_distill/hint_content.py            # 64 training problems, ~3 minutes on 2 cores
    python experiments/self_distill/hint_content.py --problems=128 --out=docs/results/hint_content.json

On-policy samples from pCoT (temperature 0.7, up to 96 tokens, as in training) are scored
under three contexts: the student's (pCoT), the teacher's with the problem's own reference
solution (the method), and the teacher's with the next problem's solution (the wrong-hint
control). Per generated token it compares how each hint moves the distribution away from
the student's:

- KL(teacher ‖ student) with the right and with the wrong hint, and KL between the two teachers;
- the correlation over positions of the two shifts of the sampled token's log-probability
  (log p_right - log p_student against log p_wrong - log p_student);
- the end-of-turn probability where samples end, under each context;
- on the reference solutions (teacher-forced), the mean log-probability of the answer
  tokens after '####' under each context: the problem-specific information a hint carries.

If the hint's content reached the target, the two teachers would differ from each other as
much as from the student, the shifts would be uncorrelated, and only the right hint would
raise the answer tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import sampling
from jaxdistill.data.synthetic import SyntheticConfig, synthetic_records
from jaxdistill.models import load
from jaxdistill.prompts import PromptConfig, prompt_pair, stop_ids


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> list:
    """log-softmax over the vocabulary at each completion token, per row: [len(completion), V] arrays."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        tokens[i, : len(p) + len(c)] = p + c
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)).astype(jnp.float32), axis=-1))
    return [logp[i, len(p) - 1 : len(p) - 1 + len(c)] for i, (p, c) in enumerate(zip(prompts, completions,
                                                                                        strict=True))]


def kl(p_log, q_log):
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def table(result: dict) -> str:
    """The per-token table of docs/results.md from a --out record."""
    p_end = result["p_end"]
    cell = lambda x: f"{x:.3f}".replace("-", "−")  # noqa: E731  (the docs' minus sign)
    return "\n".join([
        "| per generated token | right hint | wrong hint |", "|---|---:|---:|",
        f"| KL(teacher ‖ student) | {cell(result['kl_right_student'])} | {cell(result['kl_wrong_student'])} |",
        f"| change in log p of the sampled token, mean | {cell(result['mean_shift_right'])} | "
        f"{cell(result['mean_shift_wrong'])} |",
        f"| p(end of turn) where the sample ends (student: {cell(p_end['student'])}) | {cell(p_end['right'])} | "
        f"{cell(p_end['wrong'])} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    model, tokenizer = load("smollm2-135m-instruct")
    config = PromptConfig()
    records = synthetic_records(args.problems, args.seed, SyntheticConfig(steps=1, max_start=20, max_operand=12))
    contexts = {"student": [], "right": [], "wrong": []}
    for i, record in enumerate(records):
        student, right = prompt_pair(tokenizer, record, config)
        wrong = prompt_pair(tokenizer, dataclasses.replace(record, solution=records[(i + 1) % len(records)].solution),
                            config)[1]
        for name, ids in zip(contexts, (student, right, wrong), strict=True):
            contexts[name].append(ids)
    samples = sampling.generate(model, contexts["student"], max_new_tokens=96, rule=sampling.Sample(temperature=0.7),
                                rng=args.seed, eos_ids=stop_ids(tokenizer, config),
                                pad_id=tokenizer.pad_id).sequences()
    references = [tokenizer.encode(r.solution, add_special_tokens=False) for r in records]

    per_token = {k: [] for k in ("kl_right", "kl_wrong", "kl_right_wrong", "shift_right", "shift_wrong")}
    end = {"student": [], "right": [], "wrong": []}
    answer = {"student": [], "right": [], "wrong": []}
    for start in range(0, len(records), args.batch):
        rows = range(start, min(start + args.batch, len(records)))
        for texts, is_sample in ((samples, True), (references, False)):
            logp = {name: completion_logprobs(model, [contexts[name][i] for i in rows], [texts[i] for i in rows],
                                              tokenizer.pad_id) for name in contexts}
            for j, i in enumerate(rows):
                ids = np.asarray(texts[i])
                s, r, w = logp["student"][j], logp["right"][j], logp["wrong"][j]
                if is_sample:
                    taken = lambda x, ids=ids: x[np.arange(len(ids)), ids]  # noqa: E731
                    per_token["kl_right"] += kl(r, s).tolist()
                    per_token["kl_wrong"] += kl(w, s).tolist()
                    per_token["kl_right_wrong"] += kl(r, w).tolist()
                    per_token["shift_right"] += (taken(r) - taken(s)).tolist()
                    per_token["shift_wrong"] += (taken(w) - taken(s)).tolist()
                    if ids[-1] in stop_ids(tokenizer, config):
                        for name, x in (("student", s), ("right", r), ("wrong", w)):
                            end[name].append(float(np.exp(x[-1, ids[-1]])))
                else:  # the answer's tokens: everything after the '####' line's marker
                    text = tokenizer.decode(texts[i])
                    prefix = len(tokenizer.encode(text[: text.rindex("####") + 4], add_special_tokens=False))
                    for name, x in (("student", s), ("right", r), ("wrong", w)):
                        answer[name].append(float(x[np.arange(prefix, len(ids)), ids[prefix:]].mean()))
        print(f"scored {rows.stop}/{len(records)} problems", flush=True)

    shifts = np.corrcoef(per_token["shift_right"], per_token["shift_wrong"])[0, 1]
    result = {
        "problems": len(records), "tokens": len(per_token["kl_right"]), "ended": len(end["student"]),
        "kl_right_student": float(np.mean(per_token["kl_right"])),
        "kl_wrong_student": float(np.mean(per_token["kl_wrong"])),
        "kl_right_wrong": float(np.mean(per_token["kl_right_wrong"])),
        "shift_correlation": float(shifts),
        "mean_shift_right": float(np.mean(per_token["shift_right"])),
        "mean_shift_wrong": float(np.mean(per_token["shift_wrong"])),
        "p_end": {k: float(np.mean(v)) for k, v in end.items()},
        "answer_logp": {k: float(np.mean(v)) for k, v in answer.items()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
