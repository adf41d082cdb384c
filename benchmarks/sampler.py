"""Generated tokens/s of jaxdistill's sampler against transformers' `generate` (PyTorch), same model.

    .venv/bin/python benchmarks/sampler.py                      # SmolLM2-135M, batch 1 and 8
    .venv/bin/python benchmarks/sampler.py --model=gemma3-270m --new-tokens=64

Both run greedy decoding in float32 with a KV cache, on the same prompts, and produce
exactly `new_tokens` tokens per row (no early stop). Our compile time is measured
separately (first call minus a warm call) and excluded from tokens/s.
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
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-lens", default="32,128")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from jaxdistill import sampling
    from jaxdistill.models import load
    from jaxdistill.models.loading import resolve

    model, tok = load(args.model)
    path = resolve(args.model)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"# {args.model}, greedy, {args.new_tokens} new tokens, float32; {platform.processor() or 'cpu'}, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)\n")
    print("| batch | prompt | ours tok/s | transformers tok/s | ratio | our compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    n = args.new_tokens
    for batch in map(int, args.batch_sizes.split(",")):
        for prompt_len in map(int, args.prompt_lens.split(",")):
            prompts = rng.integers(100, tok.vocab_size - 100, size=(batch, prompt_len)).tolist()

            def ours(prompts=prompts):
                out = sampling.generate(model, prompts, max_new_tokens=n, eos_ids=())
                assert out.mask.all()

            def theirs(prompts=prompts, batch=batch, prompt_len=prompt_len):
                with torch.no_grad():
                    out = reference.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, prompt_len),
                                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                assert out.shape[1] == prompt_len + n

            start = time.perf_counter()
            ours()
            first = time.perf_counter() - start
            ours_s = best_of(ours, args.repeats)
            theirs()  # warm-up
            theirs_s = best_of(theirs, args.repeats)
            tokens = batch * n
            print(f"| {batch} | {prompt_len} | {tokens / ours_s:.0f} | {tokens / theirs_s:.0f} | "
                  f"{theirs_s / ours_s:.2f}x | {max(first - ours_s, 0):.1f} |", flush=True)


if __name__ == "__main__":
    printout.run(main)
