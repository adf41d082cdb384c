"""Self-distillation train step: jaxdistill against a straightforward PyTorch step, same everything.

    .venv/bin/python benchmarks/distill_step.py                  # SmolLM2-135M, 4 problems, 64 generated tokens
    .venv/bin/python benchmarks/distill_step.py --problems=8 --generated=96
    .venv/bin/python benchmarks/distill_step.py --impl=jax --attention=flash   # ours only, another kernel
    .venv/bin/python benchmarks/distill_step.py --impl=jax --attention=xla,flash   # ours, kernel against kernel
    .venv/bin/python benchmarks/distill_step.py --lora=16          # LoRA rank 16 on both sides (PyTorch: PEFT)

Both implementations load the same GGUF weights, build the same aligned batch (pCoT and
pTeacher contexts with the same 64 generated tokens), form the same entropy-matched
blend target (teacher weight 0.75; both with jaxdistill's Newton solver for k, ported to
torch), take forward KL(target || student) over the
generated tokens, and apply AdamW. PyTorch runs the teacher under no_grad and the
student with gradients (two forwards); we run one forward over both contexts, as
jaxdistill's step does, whose hand-written backward covers the student rows only.
With --lora=R both sides train rank-R adapters on every attention and MLP projection (alpha 16,
no dropout) and only the adapters: ours `models.lora` (autodiff: the hand-written backward has
no adapter gradients), PyTorch's PEFT's `get_peft_model`, AdamW over the adapters alone.

Each side runs in its own process. tokens/s counts generated tokens per second over warm
steps. The first-step loss is taken at the loaded weights on both sides (a parity check).
Memory is the peak resident memory during the steps (optimizer state included) above the
process's memory just before them.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time

import printout


class PeakMemory:
    """Samples this process's resident memory in a thread; reports the peak above the start."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def stop_mb(self) -> float:
        self.running = False
        self.thread.join()
        return (self.peak - self.start) / 2**20


def make_batch(args):
    import numpy as np

    from jaxdistill.data.synthetic import synthetic_records
    from jaxdistill.distill.step import build_batch
    from jaxdistill.models.loading import resolve
    from jaxdistill.models.tokenizer import load_tokenizer
    from jaxdistill.prompts import prompt_pair

    path = resolve(args.model)
    tok = load_tokenizer(path, arch="llama" if "smollm" in args.model else "gemma3")
    records = synthetic_records(args.problems, seed=0)
    pairs = [prompt_pair(tok, r) for r in records]
    rng = np.random.default_rng(0)
    completions = [rng.integers(100, 40000, size=args.generated).tolist() for _ in records]
    return path, build_batch([p[0] for p in pairs], [p[1] for p in pairs], completions, pad_id=tok.pad_id)


def time_train_step(model, batch, steps: int, **step_options):
    """Run jaxdistill's jitted train step on `batch`: one first call (compile), then `steps` timed calls.

    Returns the final state, the first call's loss (at the model's weights), the first
    call's seconds and each timed call's seconds. The model's arrays are donated to the step.
    """
    import jax

    from jaxdistill.distill import step as step_lib

    tx = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-5, warmup_steps=1, total_steps=100))
    graphdef, state = step_lib.init_state(model, tx)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, **step_options), state)
    start = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(0))
    first_loss = float(metrics["loss"])
    first_seconds = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, jax.random.key(0))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, first_loss, first_seconds, times


def run_jax(args):
    from jaxdistill.distill.losses import LossConfig
    from jaxdistill.models import load
    from jaxdistill.models.lora import LoraConfig, add_lora

    _, batch = make_batch(args)
    model, _ = load(args.model, attention=args.attention)
    if args.lora:
        add_lora(model, LoraConfig(rank=args.lora, alpha=16.0))
    memory = PeakMemory()
    _, first_loss, first, times = time_train_step(model, batch, args.steps, loss=LossConfig(chunk=args.chunk),
                                                  combined_forward=not args.separate_teacher)
    del model
    return {"seconds": min(times), "compile_s": first - min(times), "peak_mb": memory.stop_mb(), "loss": first_loss}


def torch_entropy_matched_target(teacher, student, weight=0.75):
    """(w * teacher + student) / k with H = H(student), solved as jaxdistill solves it (a Newton
    step in log k inside a bisection bracket, every row until all are within tolerance), so the
    two sides differ in how they run the step, not in the solver."""
    import torch

    from jaxdistill.distill.targets import K_MAX, K_MIN, MAX_STEPS, TOLERANCE

    z = weight * teacher + student
    h_goal = -(torch.softmax(student, -1) * torch.log_softmax(student, -1)).sum(-1)
    shifted = z - z.amax(-1, keepdim=True)
    lo = torch.full(z.shape[:-1], math.log(K_MIN), dtype=z.dtype)
    hi = torch.full(z.shape[:-1], math.log(K_MAX), dtype=z.dtype)
    log_k = torch.zeros_like(lo)
    for _ in range(MAX_STEPS):
        u = shifted * torch.exp(-log_k)[..., None]
        e = u.exp()
        total = e.sum(-1)
        mean, second = (e * u).sum(-1) / total, (e * u * u).sum(-1) / total
        h, slope = total.log() - mean, (second - mean * mean).clamp(min=0)
        error = (h - h_goal).abs()
        if not bool(((error > TOLERANCE) & (hi - lo > 1e-6)).any()):
            break
        hot = h > h_goal
        hi, lo = torch.where(hot, log_k, hi), torch.where(hot, lo, log_k)
        proposal = log_k + (h_goal - h) / slope.clamp(min=1e-12)
        inside = (proposal > lo) & (proposal < hi)
        log_k = torch.where(error <= TOLERANCE, log_k, torch.where(inside, proposal, (lo + hi) / 2))
    return z / log_k.clamp(math.log(K_MIN), math.log(K_MAX)).exp()[..., None]


def run_torch(args):
    import torch
    from transformers import AutoModelForCausalLM

    path, batch = make_batch(args)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        from jaxdistill.models.lora import TARGETS

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=list(TARGETS)))
    model.train()
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    mask = torch.tensor(batch["mask"], dtype=torch.long)
    target_mask = torch.tensor(batch["target_mask"])
    gen = target_mask.shape[1]
    width = tokens.shape[1] - gen
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # The batch pairs (student, teacher) rows; give each forward its own contiguous rows.
    student, teacher = ({"input_ids": tokens[rows].contiguous(), "attention_mask": mask[rows].contiguous(),
                         "position_ids": positions[rows].contiguous()}
                        for rows in (slice(0, None, 2), slice(1, None, 2)))
    memory = PeakMemory()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        region = slice(width - 1, width - 1 + gen)
        with torch.no_grad():
            teacher_logits = model(**teacher).logits[:, region]
        student_logits = model(**student).logits[:, region]
        target = torch_entropy_matched_target(teacher_logits, student_logits.detach())
        log_t, log_s = torch.log_softmax(target, -1), torch.log_softmax(student_logits, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        loss = (kl * target_mask).sum() / target_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        return float(loss)

    first_loss = step()  # warm-up, at the loaded weights
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "compile_s": 0.0, "peak_mb": memory.stop_mb(), "loss": first_loss}


def run_in_own_process(impl: str, attention: str) -> dict:
    """One side's RESULT, from a fresh process with this command's other flags."""
    flags = [a for a in sys.argv[1:] if not a.startswith(("--impl", "--attention"))]
    cmd = [sys.executable, __file__, f"--impl={impl}", f"--attention={attention}", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def compare_kernels(args, kernels: list[str]) -> None:
    """Our step once per attention kernel, each in its own process, as one table."""
    results = {kernel: run_in_own_process("jax", kernel) for kernel in kernels}
    tokens = args.problems * args.generated
    print(f"# {args.model}: {args.problems} problems x {args.generated} generated tokens, float32, AdamW, "
          "jaxdistill's step per attention kernel (xla: hand-written backward; the others: autodiff)\n")
    print("| attention | step s | generated tok/s | peak step memory MB | first-step loss | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kernel, r in results.items():
        print(f"| {kernel} | {r['seconds']:.2f} | {tokens / r['seconds']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['loss']:.8f} | {r['compile_s']:.1f} |")
    first = kernels[0]
    for kernel in kernels[1:]:
        a, b = results[first], results[kernel]
        print(f"\n{kernel} / {first}: step time {b['seconds'] / a['seconds']:.2f}x, "
              f"peak memory {b['peak_mb'] / max(a['peak_mb'], 1):.2f}x, "
              f"first-step loss difference {abs(b['loss'] - a['loss']):.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--generated", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first; the fastest counts")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--impl", choices=["both", "jax", "torch"], default="both")
    parser.add_argument("--attention", default="xla",
                        help="ours: xla (hand-written backward) or flash, cudnn, splash (autodiff)")
    parser.add_argument("--lora", type=int, default=0, help="train rank-R LoRA adapters only (0: every weight)")
    parser.add_argument("--separate-teacher", action="store_true",
                        help="ours with the teacher in a second, gradient-free forward (combined_forward=False)")
    args = parser.parse_args()
    kernels = args.attention.split(",")
    if len(kernels) > 1:
        if args.impl != "jax":
            raise SystemExit("several kernels (--attention=xla,flash) compare our step only: add --impl=jax")
        compare_kernels(args, kernels)
        return
    if args.impl != "both":
        result = (run_jax if args.impl == "jax" else run_torch)(args)
        print("RESULT " + json.dumps(result))
        return
    results = {impl: run_in_own_process(impl, args.attention) for impl in ("jax", "torch")}
    tokens = args.problems * args.generated
    j, t = results["jax"], results["torch"]
    trains = f"LoRA rank {args.lora} (PyTorch: PEFT)" if args.lora else "every weight"
    print(f"# {args.model}: {args.problems} problems x {args.generated} generated tokens, float32, AdamW, "
          f"training {trains}\n")
    print("| implementation | step s | generated tok/s | peak step memory MB | first-step loss | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    layout = "teacher in a 2nd forward" if args.separate_teacher else "one forward, both contexts"
    ours = f"jaxdistill ({layout})"
    for name, r in ((ours, j), ("PyTorch (teacher no_grad + student)", t)):
        print(f"| {name} | {r['seconds']:.2f} | {tokens / r['seconds']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['loss']:.5f} | {r['compile_s']:.1f} |")
    print(f"\nspeed ratio (ours / PyTorch): {t['seconds'] / j['seconds']:.2f}x; "
          f"memory ratio (ours / PyTorch): {j['peak_mb'] / max(t['peak_mb'], 1):.2f}")


if __name__ == "__main__":
    printout.run(main)
