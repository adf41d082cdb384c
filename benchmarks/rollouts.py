"""Rollouts: prefix sharing against prefilling every copy; dropping finished rows against
decoding the whole batch to its longest row.

    .venv/bin/python benchmarks/rollouts.py                     # SmolLM2-135M, 4 problems x 4 samples
    .venv/bin/python benchmarks/rollouts.py --samples=8 --prompt-lens=1024 --new-tokens=32
    .venv/bin/python benchmarks/rollouts.py --mode=finished     # 64 problems' pCoT, up to 96 tokens

prefix: the same sampler twice on the same rows (each problem's prompt repeated `samples`
times, temperature 1): `share_prompts=True` prefills each prompt once and copies its KV-cache
rows, `share_prompts=False` prefills every row (the sampler before prefix sharing).

finished: the default job's rollout, i.e. the pCoT prompts of synthetic problems sampled at
temperature 1 to the end of turn or the token cap: `compact_every=16` gathers the live rows
into a smaller batch bucket once they fit one, `compact_every=0` keeps every row to the end (the sampler
before). The samples are identical both ways (tests/test_sampling.py); the ratio is the time
saved. Compile time excluded.
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


def finished_rows(model, tokenizer, args):
    from jaxdistill.data.synthetic import synthetic_records
    from jaxdistill.prompts import PromptConfig, prompt_pair

    prompts = [prompt_pair(tokenizer, r, PromptConfig())[0] for r in synthetic_records(args.rows, seed=0)]
    print("| rows | new tokens | generated (mean / max length) | row-steps decoded | whole batch s "
          "| dropping finished rows s | speed-up |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    from jaxdistill import sampling

    times, out = {}, None
    for every in (0, 16):
        def run(every=every):
            return sampling.generate(model, prompts, max_new_tokens=args.new_tokens, rule=sampling.Sample(1.0),
                                     rng=0, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, compact_every=every)
        out = run()  # compile
        times[every] = best_of(run, args.repeats)
    lengths = out.lengths
    print(f"| {len(prompts)} | {args.new_tokens} | {lengths.mean():.0f} / {lengths.max()} | "
          f"{row_steps(lengths, 16) / row_steps(lengths, 0):.2f} | {times[0]:.2f} | {times[16]:.2f} | "
          f"{times[0] / times[16]:.2f}x |", flush=True)


def row_steps(lengths, every: int) -> int:
    """Rows times decode steps the sampler runs, finished rows included, with compaction every
    `every` steps (0: none) into the smallest power-of-two bucket at most half the batch."""
    from jaxdistill.sampling import bucket

    rows, total, longest = bucket(len(lengths), minimum=1), 0, int(lengths.max())
    for step in range(longest):
        if every and step and step % every == 0:
            live = int((lengths > step).sum())
            if bucket(live, minimum=1) <= rows // 2:
                rows = bucket(live, minimum=1)
        total += rows
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--samples", default="4,8")
    parser.add_argument("--prompt-lens", default="256,1024")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=("prefix", "finished"), default="prefix")
    parser.add_argument("--rows", type=int, default=64, help="finished mode: problems")
    args = parser.parse_args()
    if args.mode == "finished" and args.new_tokens == 32:
        args.new_tokens = 96  # the default job's cap

    import jax

    from jaxdistill import sampling
    from jaxdistill.models import load

    model, tokenizer = load(args.model)
    if args.mode == "finished":
        print(f"{args.model}, {platform.processor() or platform.machine()}, jax {jax.__version__}, temperature 1")
        return finished_rows(model, tokenizer, args)
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
    printout.run(main)
