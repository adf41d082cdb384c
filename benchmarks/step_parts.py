"""Where the self-distillation step spends its time, part by part, beside the same parts in
PyTorch: the forward over both contexts, the student rows' forward and backward, the loss from
hidden states (vocabulary projection, entropy-matched target, KL) with its gradient, and the
whole loss with its gradient. Companion to distill_step.py (the whole step); same model and batch.

    .venv/bin/python benchmarks/step_parts.py      # SmolLM2-135M, 4 problems x 64 generated tokens

Each side runs in its own process; each part is the fastest of 3 warm calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import printout
from distill_step import make_batch, torch_entropy_matched_target

ARGS = types.SimpleNamespace(model="smollm2-135m-instruct", problems=4, generated=64)
PARTS = {
    "forward": "forward over the student and teacher rows (hidden states, no gradient)",
    "student": "student rows: forward and backward (a fixed cotangent on the hidden states)",
    "loss": "loss from the generated columns' hidden states: forward",
    "loss_grad": "loss from hidden states and its gradient with respect to the student's",
    "step": "whole loss and its gradient (no optimizer)",
    "matmuls": "an MLP projection's three products alone ([1024, 576] x [576, 1536], forward and backward)",
}
MATMUL = (1024, 576, 1536)


def matmul_shapes() -> tuple[tuple[int, int], ...]:
    n, d, f = MATMUL
    return (n, d), (d, f), (n, f)


def fastest(f, *args, sync=lambda x: x, repeats: int = 3) -> float:
    sync(f(*args))  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(f(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def jax_parts() -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdistill.distill import step as step_lib
    from jaxdistill.distill.losses import LossConfig, TargetConfig, chunked_distill_loss
    from jaxdistill.models import load

    batch = {k: jnp.asarray(v) for k, v in make_batch(ARGS)[1].items()}
    model, _ = load(ARGS.model)
    graphdef, params = nnx.split(model)
    tokens, mask = batch["tokens"], batch["mask"]
    region = step_lib.completion_columns(batch)
    labels = step_lib.split_contexts(tokens)[0][:, region.start + 1 : region.stop + 1]
    hidden = lambda p, rows: nnx.merge(graphdef, p).hidden_states(tokens[rows], None, mask[rows])[0]  # noqa: E731
    cotangent = jax.random.normal(jax.random.key(0), (tokens.shape[0] // 2, *tokens.shape[1:], model.config.d_model))
    forward = jax.jit(lambda p: hidden(p, slice(None)))
    student, teacher = step_lib.split_contexts(forward(params)[:, region])
    loss = lambda s, t: jnp.sum(chunked_distill_loss(  # noqa: E731
        model.logits, s, t, labels, TargetConfig(), LossConfig())["loss"])
    whole = lambda p: step_lib.distill_loss(graphdef, p, None, batch, TargetConfig(), LossConfig())[0]  # noqa: E731
    sync = jax.block_until_ready
    x, w, dy = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(matmul_shapes()))
    products = jax.jit(lambda x, w, dy: (x @ w, dy @ w.T, x.T @ dy))
    return {
        "forward": fastest(forward, params, sync=sync),
        "student": fastest(jax.jit(jax.grad(lambda p: jnp.sum(hidden(p, slice(0, None, 2)) * cotangent))), params,
                           sync=sync),
        "loss": fastest(jax.jit(loss), student, teacher, sync=sync),
        "loss_grad": fastest(jax.jit(jax.grad(loss)), student, teacher, sync=sync),
        "step": fastest(jax.jit(jax.value_and_grad(whole)), params, sync=sync),
        "matmuls": fastest(products, x, w, dy, sync=sync, repeats=20),
    }


def torch_parts() -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    path, batch = make_batch(ARGS)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokens, mask = torch.tensor(batch["tokens"], dtype=torch.long), torch.tensor(batch["mask"], dtype=torch.long)
    target_mask = torch.tensor(batch["target_mask"])
    gen = target_mask.shape[1]
    region = slice(tokens.shape[1] - gen - 1, tokens.shape[1] - 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = {name: {"input_ids": tokens[r].contiguous(), "attention_mask": mask[r].contiguous(),
                   "position_ids": positions[r].contiguous()} for name, r in
            (("student", slice(0, None, 2)), ("teacher", slice(1, None, 2)))}
    torch.manual_seed(0)
    cotangent = torch.randn(*rows["student"]["input_ids"].shape, model.config.hidden_size)

    def forward():
        with torch.no_grad():
            return [model.model(**rows[name]).last_hidden_state for name in ("student", "teacher")]

    def student_rows():
        model.zero_grad()
        (model.model(**rows["student"]).last_hidden_state * cotangent).sum().backward()

    def loss(h_student, h_teacher):
        with torch.no_grad():
            teacher_logits = model.lm_head(h_teacher)
        student_logits = model.lm_head(h_student)
        target = torch_entropy_matched_target(teacher_logits, student_logits.detach())
        log_t, log_s = torch.log_softmax(target, -1), torch.log_softmax(student_logits, -1)
        return (log_t.exp() * (log_t - log_s)).sum()

    h_student, h_teacher = (h[:, region] for h in forward())

    def loss_grad():
        h = h_student.clone().requires_grad_(True)
        loss(h, h_teacher).backward()

    def step():
        model.zero_grad()
        with torch.no_grad():
            teacher_h = model.model(**rows["teacher"]).last_hidden_state[:, region]
        loss(model.model(**rows["student"]).last_hidden_state[:, region], teacher_h).backward()

    x, w, dy = (torch.randn(*shape) for shape in matmul_shapes())
    with torch.no_grad():
        loss_only = fastest(loss, h_student, h_teacher)
    return {"forward": fastest(forward), "student": fastest(student_rows), "loss": loss_only,
            "loss_grad": fastest(loss_grad), "step": fastest(step),
            "matmuls": fastest(lambda: (x @ w, dy @ w.T, x.T @ dy), repeats=20)}


def main() -> None:
    if len(sys.argv) > 1:
        print("RESULT " + json.dumps(jax_parts() if sys.argv[1] == "--impl=jax" else torch_parts()))
        return
    results = {}
    for impl in ("jax", "torch"):
        out = subprocess.run([sys.executable, __file__, f"--impl={impl}"], capture_output=True, text=True,
                             check=True).stdout
        results[impl] = json.loads(out.split("RESULT ", 1)[1])
    print(f"# {ARGS.model}, {ARGS.problems} problems x {ARGS.generated} generated tokens, float32; "
          "fastest of 3 warm calls\n")
    print("| part | jaxdistill s | PyTorch s | speed ratio (PyTorch s / ours) |\n|---|---:|---:|---:|")
    for part, name in PARTS.items():
        ours, theirs = results["jax"][part], results["torch"][part]
        print(f"| {name} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x |")
    flops = 3 * 2 * MATMUL[0] * MATMUL[1] * MATMUL[2]
    print(f"\nmatmul rate: jaxdistill (XLA:CPU) {flops / results['jax']['matmuls'] / 1e9:.0f} GFLOP/s, "
          f"PyTorch {flops / results['torch']['matmuls'] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    printout.run(main)
