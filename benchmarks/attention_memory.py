"""Ahead-of-time compiled memory of the self-distillation step at Qwen3-8B width, per attention kernel.

    .venv/bin/python benchmarks/attention_memory.py                       # T = 2k, 4k, 8k, 2 layers
    .venv/bin/python benchmarks/attention_memory.py --lengths=8192 --kernels=flash:full --layers=36

The real loss and gradient (`distill.step.distill_loss`, blend target, forward KL): one
student/teacher pair of rows of T tokens each, the second half of each row generated,
bfloat16 parameters and activations, Qwen3-8B's dimensions (d_model 4096, 32 query and 8
kv heads of 128, d_ff 12288, vocab 151936) with `--layers` layers. Nothing is allocated:
the step is lowered on abstract arrays and compiled for this machine's backend, and XLA
reports the temporaries it needs besides the arguments and outputs. Run it on a GPU to
get that backend's numbers (cudnn is GPU-only; flash and xla compile everywhere).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import printout
from flax import nnx

from jaxdistill.distill.losses import LossConfig, TargetConfig
from jaxdistill.distill.step import distill_loss
from jaxdistill.models import Decoder, ModelConfig

GIB = 2**30


def qwen3_8b(layers: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=151936, d_model=4096, d_ff=12288, num_layers=layers, num_heads=32,
                       num_kv_heads=8, head_dim=128, norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                       tie_embeddings=False, max_seq_len=40960)


def step_memory(config: ModelConfig, length: int, attention: str, remat: str) -> tuple[float, float]:
    """(temporaries GiB, compile seconds) of value_and_grad of the distillation loss."""
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16,
                                              attention=attention, remat=remat))
    graphdef, params = nnx.split(abstract)
    generated = length // 2
    batch = {"tokens": jax.ShapeDtypeStruct((2, length), jnp.int32), "mask": jax.ShapeDtypeStruct((2, length), bool),
             "target_mask": jax.ShapeDtypeStruct((1, generated), bool),
             "end_mask": jax.ShapeDtypeStruct((1, generated), bool)}

    def loss(params, batch):
        return distill_loss(graphdef, params, None, batch, TargetConfig(), LossConfig())[0]

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / GIB, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--kernels", default="xla:full,flash:full,flash:dots,flash:none",
                        help="comma-separated ATTENTION:REMAT, attention one of xla, flash, cudnn, splash and "
                             "remat a name in transformer.REMAT_POLICIES (xla: its hand-written backward)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    config = qwen3_8b(args.layers)
    lengths = [int(x) for x in args.lengths.split(",")]
    kernels = [kernel.split(":") for kernel in args.kernels.split(",")]
    if any(len(kernel) != 2 for kernel in kernels):
        raise SystemExit(f"--kernels={args.kernels}: give ATTENTION:REMAT pairs, e.g. xla:full,flash:dots")
    print(f"Qwen3-8B width, {args.layers} layers, bfloat16, backend {jax.default_backend()}, jax {jax.__version__}; "
          "one student/teacher pair, half of each row generated")
    rows = []
    for attention, remat in kernels:
        cells = []
        for length in lengths:
            gib, seconds = step_memory(config, length, attention, remat)
            cells.append(f"{gib:.2f} GiB")
            print(f"  {attention}, {remat}, T={length}: {gib:.2f} GiB temporaries (compiled in {seconds:.0f} s)",
                  flush=True)
        rows.append(f"| {attention}, {remat} | " + " | ".join(cells) + " |")
    print("| attention, remat | " + " | ".join(f"T = {t}" for t in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    print("\n".join(rows))


if __name__ == "__main__":
    printout.run(main)
