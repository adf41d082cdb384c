"""Rollouts with several samples per problem: prefix sharing against prefilling every copy.

    .venv/bin/python benchmarks/rollouts.py                     # SmolLM2-135M, 4 problems x 4 samples
    .venv/bin/python benchmarks/rollouts.py --samples=8 --prompt-len=1024 --new-tokens=32

The same sampler twice on the same rows (each problem's prompt repeated `samples` times,
temperature 1): `share_prompts=True` prefills each prompt once and copies its KV-cache rows,
`share_prompts=False` prefills every row (the sampler before prefix sharing). The samples
are identical (tests/test_sampling.py); the ratio is the time saved. Compile time excluded.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--samples", default="4,8")
    parser.add_argument("--prompt-lens", default="256,1024")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax

    from jaxdistill import sampling
    from jaxdistill.models import load

    model, tokenizer = load(args.model)
    rng = np.random.default_rng(0)
    print(f"{args.model}, {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{args.problems} problems, {args.new_tokens} new tokens, temperature 1")
    print("| prompt tokens | samples per problem | rows | prefill every row s | shared prefix s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for prompt_len in (int(x) for x in args.prompt_lens.split(",")):
        problems = [rng.integers(100, 20000, size=prompt_len).tolist() for _ in range(args.problems)]
        for samples in (int(x) for x in args.samples.split(",")):
            rows = [p for p in problems for _ in range(samples)]
            times = {}
            for share in (False, True):
                def run(share=share, rows=rows):
                    sampling.generate(model, rows, max_new_tokens=args.new_tokens, rule=sampling.Sample(1.0),
                                      rng=0, share_prompts=share)
                run()  # compile
                times[share] = best_of(run, args.repeats)
            print(f"| {prompt_len} | {samples} | {len(rows)} | {times[False]:.2f} | {times[True]:.2f} | "
                  f"{times[False] / times[True]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
