"""Branch search against the same stack sampling independent sequences: generated tokens per second.

    .venv/bin/python benchmarks/search.py                       # the default 3-teacher stack, 2 problems
    .venv/bin/python benchmarks/search.py --problems=4 --max-live=16

Branch search decodes all live branches of a level as one batch, and a child starts from
its parent's KV cache (rows copied, no re-prefill), so prefixes are decoded once. The
reference decodes as many independent rows of the same prompt, each from its own prefill,
with the same lockstep stack (temperature sampling), enough rows to generate at least the
tokens the search generated. Both count generated tokens the same way (prefixes once for
the search; every row's own tokens for the reference). Each side runs once untimed first,
so compile time is excluded. The issue's goal: search >= 2x the reference's tokens/s.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import printout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--max-live", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--budget", type=int, default=768)
    args = parser.parse_args()

    import jax

    from jaxdistill import sampling
    from jaxdistill.data.synthetic import synthetic_records
    from jaxdistill.teachers import aggregate as agg_lib
    from jaxdistill.teachers import search as search_lib
    from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block

    teachers = [TeacherConfig(name="smollm2-chat", model="smollm2-135m-instruct"),
                TeacherConfig(name="smollm2-fewshot", model="smollm2-135m-instruct", style="fewshot"),
                TeacherConfig(name="gemma3-fewshot", model="gemma3-270m", style="fewshot")]
    stack = TeacherStack(teachers, fewshot=fewshot_block(synthetic_records(2, 0, split="train")))
    problems = synthetic_records(args.problems + 1, 0, split="test")  # the first one warms up
    config = search_lib.SearchConfig(max_live=args.max_live, token_budget=args.budget,
                                     max_new_tokens=args.new_tokens)
    aggregate = agg_lib.MeanProbs()
    print(f"3 teachers (SmolLM2 chat + few-shot, Gemma 3 few-shot), {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}, max_live {args.max_live}, budget {args.budget}, {args.new_tokens} tokens per branch")
    print("| problem | search tokens | search s | independent rows | their tokens | independent s | "
          "search tok/s | independent tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for i, record in enumerate(problems):
        def search(record=record):
            return search_lib.search(stack, record, config, aggregate=aggregate)

        def independent(rows, record=record, seed=i):
            out = stack.run([record] * rows, aggregate=aggregate, rule=sampling.Sample(0.7),
                            max_new_tokens=args.new_tokens, seed=seed)
            return int(out.mask.sum())

        search()  # compile the live-branch buckets this problem reaches
        start = time.perf_counter()
        result = search()
        search_s = time.perf_counter() - start
        rows = sampling.bucket(max(1, math.ceil(result.tokens / args.new_tokens)), minimum=1)
        independent(rows)
        start = time.perf_counter()
        tokens = independent(rows)
        independent_s = time.perf_counter() - start
        if i == 0:
            continue  # warm-up problem
        ratio = (result.tokens / search_s) / (tokens / independent_s)
        ratios.append(ratio)
        print(f"| {record.uid} | {result.tokens} | {search_s:.1f} | {rows} | {tokens} | {independent_s:.1f} | "
              f"{result.tokens / search_s:.1f} | {tokens / independent_s:.1f} | {ratio:.2f}x |", flush=True)
    print(f"geometric mean ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}x")


if __name__ == "__main__":
    printout.run(main)
