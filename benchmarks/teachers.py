"""Lockstep teacher-stack decoding against running its members one after another.

    .venv/bin/python benchmarks/teachers.py                        # SmolLM2 chat + few-shot + Gemma 3 270M
    .venv/bin/python benchmarks/teachers.py --batch=16 --new-tokens=64

The stack scores a fixed continuation of `new_tokens` pivot tokens (forced mode: every
step runs every teacher's forward, projects onto the pivot vocabulary, aggregates and
feeds each teacher its piece). The reference is what a user would otherwise do: each
member decodes `new_tokens` tokens alone with our own jitted sampler (greedy, no early
stop), one after another; combining in Python would only add to that. The goal is that
the stack costs at most 1.2x the members' summed time (alignment and aggregation overhead
under 20%). Compile time is excluded (one warm-up call each).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import printout


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax

    from jaxdistill import sampling
    from jaxdistill.data.synthetic import synthetic_records
    from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block

    teachers = [TeacherConfig("smollm2-chat", "smollm2-135m-instruct"),
                TeacherConfig("smollm2-fewshot", "smollm2-135m-instruct", style="fewshot"),
                TeacherConfig("gemma3-fewshot", "gemma3-270m", style="fewshot")]
    stack = TeacherStack(teachers, fewshot=fewshot_block(synthetic_records(2, 0)))
    records = synthetic_records(args.batch, 1, split="test")
    rng = np.random.default_rng(0)
    allowed = np.flatnonzero(stack.allowed & ~np.asarray(stack.stops.end))
    forced = rng.choice(allowed, size=(args.batch, args.new_tokens)).tolist()
    print(f"# {len(teachers)} teachers ({', '.join(stack.names)}), batch {args.batch}, {args.new_tokens} tokens, "
          f"float32; {platform.processor() or 'cpu'}, jax {jax.__version__} ({jax.default_backend()})\n")

    def lockstep():
        out = stack.run(records, forced=forced, top_k=10)
        assert out.mask.sum() == args.batch * args.new_tokens

    def members():
        for i, t in enumerate(teachers):
            model, tokenizer = stack.models[t.model]
            prompts = [stack.prompt(i, r) for r in records]
            sampling.generate(model, prompts, max_new_tokens=args.new_tokens, pad_id=tokenizer.pad_id)

    lockstep(), members()  # compile
    ours, reference = best_of(lockstep, args.repeats), best_of(members, args.repeats)
    tokens = args.batch * args.new_tokens
    print("| | seconds | pivot tokens/s | ratio to members one after another |")
    print("|---|---:|---:|---:|")
    print(f"| lockstep stack (aggregated, aligned) | {ours:.2f} | {tokens / ours:.0f} | {ours / reference:.2f} |")
    print(f"| members one after another (sum) | {reference:.2f} | {tokens / reference:.0f} | 1.00 |")


if __name__ == "__main__":
    printout.run(main)
