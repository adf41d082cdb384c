"""Where jaxdistill's self-distillation step spends its time on this machine: the combined
forward, the chunked loss (vocabulary projection, entropy-matched target, KL) and its backward,
and the loss with its gradient. Companion to distill_step.py (which compares the whole step with
PyTorch's); same model and batch.

    .venv/bin/python benchmarks/step_parts.py      # SmolLM2-135M, 4 problems x 64 generated tokens
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
from distill_step import make_batch
from flax import nnx

from jaxdistill.distill import step as step_lib
from jaxdistill.distill.losses import LossConfig, TargetConfig, chunked_distill_loss
from jaxdistill.models import load


def fastest(name: str, f, *args, repeats: int = 3) -> None:
    jax.block_until_ready(f(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    print(f"| {name} | {min(times):.2f} |", flush=True)


def main() -> None:
    args = types.SimpleNamespace(model="smollm2-135m-instruct", problems=4, generated=64)
    batch = {k: jnp.asarray(v) for k, v in make_batch(args)[1].items()}
    model, _ = load(args.model)
    graphdef, params = nnx.split(model)
    region = step_lib.completion_columns(batch)
    labels = step_lib.split_contexts(batch["tokens"])[0][:, region.start + 1 : region.stop + 1]
    forward = jax.jit(lambda p: nnx.merge(graphdef, p).hidden_states(batch["tokens"], None, batch["mask"])[0])
    loss = lambda p: step_lib.distill_loss(graphdef, p, None, batch, TargetConfig(), LossConfig())[0]  # noqa: E731
    student, teacher = step_lib.split_contexts(forward(params)[:, region])
    only_loss = jax.jit(lambda s, t: jnp.sum(chunked_distill_loss(
        model.logits, s, t, labels, TargetConfig(), LossConfig())["loss"]))
    rows, width = batch["tokens"].shape
    print(f"SmolLM2-135M, {rows} rows x {width} tokens (student and teacher contexts), fastest of 3\n")
    print("| part | seconds |\n|---|---:|")
    fastest(f"forward over all {rows} rows (hidden states)", forward, params)
    fastest("chunked loss on the generated columns, forward", only_loss, student, teacher)
    fastest("chunked loss, gradient with respect to the student's hidden states", jax.jit(jax.grad(only_loss)),
            student, teacher)
    fastest("distill loss (combined forward + chunked loss)", jax.jit(loss), params)
    fastest("distill loss and its gradient (hand-written backward; no optimizer)", jax.jit(jax.value_and_grad(loss)),
            params)


if __name__ == "__main__":
    main()
