"""What a trained student writes first, against the untrained model under both prompts.

    python experiments/self_distill/first_tokens.py --workdir=runs/grid/gemma-blend-s0 --words=Note,Solution,Hint

For a finished training run (any arm, any model): on the last `--problems` training problems,
the untrained model's and the trained model's most likely first response tokens under pCoT
and pTeacher (geometric mean over the problems), the mean probability of `--words` (their
first token) as the first response token, and the trained model's greedy answers to a few
held-out problems. It shows whether training moved the student toward what the hinted
context makes likelier (words of the hint's frame, say) rather than toward the answer.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxdistill import models, sampling
from jaxdistill.data import load_records
from jaxdistill.distill.config import prompts_for
from jaxdistill.models.loading import training_run
from jaxdistill.prompts import prompt_pair, stop_ids


def first_token_logp(model, prompts: list[list[int]]) -> np.ndarray:
    """[len(prompts), V] log-probabilities of the first response token (one prompt at a time: no padding)."""
    return np.stack([np.asarray(jax.nn.log_softmax(model(jnp.asarray([p]))[0, -1].astype(jnp.float32)))
                     for p in prompts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished `jaxdistill train` run")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--words", default="", help="comma-separated words whose first-token probability to print")
    parser.add_argument("--answers", type=int, default=4, help="held-out greedy answers to print")
    args = parser.parse_args()
    run = training_run(epath.Path(args.workdir).absolute())
    if run is None:
        parser.error(f"{args.workdir} is not a finished training run (no summary.json and checkpoints).")
    config = ml_collections.ConfigDict(run)
    train, held_out = load_records(config.data)
    prompt_config = prompts_for(config, train)
    for name, label in ((config.model, "untrained"), (args.workdir, "trained")):
        model, tokenizer = models.load(name)
        pairs = [prompt_pair(tokenizer, r, prompt_config) for r in train[-args.problems:]]
        words = [w for w in args.words.split(",") if w]
        ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
        for context, side in (("pCoT", 0), ("pTeacher", 1)):
            logp = first_token_logp(model, [p[side] for p in pairs])
            top = np.argsort(-logp.mean(axis=0))[:6]
            print(f"{label} {context}: most likely first tokens",
                  [(tokenizer.decode([int(t)]), round(float(np.exp(logp[:, t].mean())), 3)) for t in top])
            if ids:
                p = np.exp(logp[:, ids]).mean(axis=0)
                print(f"{label} {context}: mean p(first token) of",
                      ", ".join(f"{w!r} {v:.2e}" for w, v in zip(words, p, strict=True)))
        if args.answers:
            shown = held_out[: args.answers]
            out = sampling.generate(model, [prompt_pair(tokenizer, r, prompt_config)[0] for r in shown],
                                    max_new_tokens=40, eos_ids=stop_ids(tokenizer, prompt_config),
                                    pad_id=tokenizer.pad_id).sequences()
            for record, tokens in zip(shown, out, strict=True):
                print(f"{label} pCoT answer (reference {record.answer}): {tokenizer.decode(tokens)!r}")


if __name__ == "__main__":
    main()
