"""Model-FLOPs utilisation of the self-distillation train step (for a lent GPU).

    .venv/bin/python benchmarks/distill_mfu.py                       # Llama-3.2-1B shape, bf16 compute, on a GPU
    .venv/bin/python benchmarks/distill_mfu.py --preset=tiny --peak-tflops=0.3   # a CPU smoke run
    .venv/bin/python benchmarks/distill_mfu.py --preset=qwen3-8b --layers=8 --param-dtype=bfloat16 --remat
                                                            # Qwen3-8B width, as many layers as fit one GPU

A random-initialised Llama of the chosen shape runs jaxdistill's jitted step on a paired
batch (student pCoT + teacher pTeacher rows, random tokens) with the default target and
loss. MFU = model FLOPs per step / step time / the device's peak dense FLOP/s.

Model FLOPs count what the step must do, not what it recomputes: the forward over both
contexts, the backward (2x the forward) over the student rows only, causal attention as
full T x T (the usual convention), and the vocabulary projection on the generated
columns (the teacher's forward; the student's forward and backward).
"""

from __future__ import annotations

import argparse
import json

import printout
from distill_step import time_train_step  # benchmarks/ is on sys.path when a script here runs

PRESETS = {  # Llama-3.2-1B's and Qwen3-8B's shapes, and a tiny one for CPU smoke runs
    "llama-1b": dict(vocab_size=128256, d_model=2048, d_ff=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                     head_dim=64, rope_theta=500000.0),
    "qwen3-8b": dict(vocab_size=151936, d_model=4096, d_ff=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                     head_dim=128, rope_theta=1000000.0, qk_norm=True, tie_embeddings=False),
    "tiny": dict(vocab_size=4096, d_model=256, d_ff=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts


def step_flops(c, problems: int, seq: int, generated: int) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    per_token = 2 * (c.d_model * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, k, v
                     + c.num_heads * c.head_dim * c.d_model + 3 * c.d_model * c.d_ff)  # o, gated MLP
    per_token += 4 * seq * c.num_heads * c.head_dim  # scores and the weighted sum
    forward = 2 * problems * seq * per_token * c.num_layers  # both contexts
    backward = 2 * problems * seq * per_token * c.num_layers  # 2x forward, student rows only
    head = 2 * c.d_model * c.vocab_size * problems * generated  # one projection of one context
    return forward + backward + head * (1 + 3)  # teacher forward; student forward + backward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256, help="pCoT tokens; pTeacher adds --hint more")
    parser.add_argument("--hint", type=int, default=128)
    parser.add_argument("--generated", type=int, default=512)
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak; default: by device kind")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxdistill.distill import step as step_lib
    from jaxdistill.models import Decoder, ModelConfig

    device = jax.devices()[0]
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), 0.0)
    if not peak:
        raise SystemExit(f"no peak FLOP/s known for {device.device_kind!r}; pass --peak-tflops.")
    shape = PRESETS[args.preset] | ({"num_layers": args.layers} if args.layers else {})
    config = ModelConfig(arch="qwen3" if args.preset.startswith("qwen3") else "llama", **shape)
    model = Decoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(args.param_dtype),
                    compute_dtype=jnp.dtype(args.compute_dtype), remat=args.remat)
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, config.vocab_size, n).tolist()  # noqa: E731
    batch = step_lib.build_batch([tokens(args.prompt) for _ in range(args.problems)],
                                 [tokens(args.prompt + args.hint) for _ in range(args.problems)],
                                 [tokens(args.generated) for _ in range(args.problems)], pad_id=0)
    seq = batch["tokens"].shape[1]
    state, first, compile_s, times = time_train_step(model, jax.device_put(batch), args.steps)
    del model
    seconds = float(np.median(times))
    flops = step_flops(config, args.problems, seq, batch["target_mask"].shape[1])
    params = sum(x.size for x in jax.tree.leaves(state.params))
    result = {"device": device.device_kind, "preset": args.preset, "params": params, "rows": 2 * args.problems,
              "seq": seq, "step_s": seconds, "tflops_per_s": flops / seconds / 1e12, "peak_tflops": peak,
              "mfu": flops / seconds / (peak * 1e12), "first_loss": first, "compile_s": compile_s,
              "memory": device.memory_stats() if hasattr(device, "memory_stats") else None}
    print(f"{args.preset} ({params / 1e6:.0f}M params) on {device.device_kind}: {2 * args.problems} rows x {seq} "
          f"tokens, step {seconds:.3f} s (median of {args.steps}), {result['tflops_per_s']:.1f} TFLOP/s, "
          f"MFU {100 * result['mfu']:.1f}% of {peak:g} TFLOP/s")
    print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    printout.run(main)
