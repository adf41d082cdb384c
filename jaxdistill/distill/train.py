"""The self-distillation loop: sample genCoT on-policy -> score both contexts -> update.

`run(config)` is what `python -m jaxdistill train --config=...` calls. Arms (config.arm):
- "blend": target (w*teacher + student)/k with entropy-matched k (the method);
- "fixed_k": the same blend with a fixed k (config.fixed_k);
- "teacher": the teacher's logits alone (plain on-policy self-distillation);
- "sft": cross-entropy on the reference solutions (no sampling).
config.guided=True samples genCoT from the blended target instead of the student.

Everything random derives from (config.seed, step), and the data iterator's position is
saved with each checkpoint, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from jaxdistill import mesh as mesh_lib
from jaxdistill import sampling
from jaxdistill.data import load_records
from jaxdistill.data.records import extract_answer
from jaxdistill.distill import step as step_lib
from jaxdistill.distill.losses import LossConfig, TargetConfig
from jaxdistill.distill.prompts import PromptConfig, prompt_pair
from jaxdistill.distill.targets import blend_logits
from jaxdistill.eval.harness import evaluate, format_table
from jaxdistill.models import load

ARMS = ("blend", "fixed_k", "teacher", "sft")


@dataclasses.dataclass(frozen=True)
class GuidedRule:
    """Guided sampling over paired rows, as in the train batch: row 2i is problem i's student
    context, row 2i+1 its teacher context; both rows get the token sampled from the blend."""

    teacher_weight: float = 0.75
    temperature: float = 1.0
    fixed_k: float | None = None

    def __call__(self, logits, key, step):
        student, teacher = step_lib.split_contexts(logits)
        target = blend_logits(teacher, student, self.teacher_weight, self.fixed_k)
        token = jax.random.categorical(key, target / self.temperature)
        return jnp.repeat(token, 2).astype(jnp.int32)


def target_for(config) -> TargetConfig:
    if config.arm == "teacher":
        return TargetConfig(kind="teacher")
    return TargetConfig(kind="blend", teacher_weight=config.teacher_weight,
                        temperature=config.fixed_k if config.arm == "fixed_k" else None)


def data_iterator(records, seed: int):
    """An endless, seeded, reshuffled stream of records whose position can be saved."""
    epochs = 10_000  # finite so grain can shuffle across the whole index space
    return iter(grain.MapDataset.source(records).repeat(epochs).shuffle(seed=seed).to_iter_dataset())


def sample_completions(model, tokenizer, pairs, config, key):
    """genCoT for each problem: on-policy from pCoT, or guided by the blend of both contexts."""
    s = config.sample
    common = dict(max_new_tokens=s.max_new_tokens, rng=key, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    if config.guided:
        rule = GuidedRule(config.teacher_weight, s.temperature, config.fixed_k if config.arm == "fixed_k" else None)
        out = sampling.generate(model, [prompt for pair in pairs for prompt in pair], rule=rule, **common)
        return out.sequences()[0::2]  # the student rows
    out = sampling.generate(model, [p[0] for p in pairs], rule=sampling.Sample(s.temperature, s.top_k, s.top_p),
                            **common)
    return out.sequences()


def run(config) -> dict:
    if config.arm not in ARMS:
        raise ValueError(f"arm {config.arm!r} is not one of {ARMS}.")
    samples = config.get("samples_per_problem", 1)
    if samples < 1 or (config.arm == "sft" and samples != 1):
        raise ValueError(f"samples_per_problem must be >= 1 (and 1 for the sft arm, which samples nothing), "
                         f"got {samples}.")
    workdir = Path(config.workdir).expanduser().resolve()  # orbax needs an absolute path
    workdir.mkdir(parents=True, exist_ok=True)
    if config.get("distributed"):
        mesh_lib.initialize_distributed(**config.distributed)
    mesh = mesh_lib.make_mesh(dict(config.mesh)) if config.get("mesh") else None
    model, tokenizer = load(config.model, dtype=config.dtype, compute_dtype=config.compute_dtype or None,
                            mesh=mesh, remat=config.remat)
    train_records, eval_records = load_records(config.data)
    prompt_config = PromptConfig(**config.prompts) if config.get("prompts") else PromptConfig()
    eval_kwargs = dict(prompt_config=prompt_config, max_new_tokens=config.eval.max_new_tokens,
                       batch_size=config.eval.batch_size, mean_at_k=config.eval.mean_at_k)

    optim = step_lib.OptimConfig(**config.optim, total_steps=config.steps)
    tx = step_lib.make_optimizer(optim)
    graphdef, state = step_lib.init_state(model, tx, frozen_teacher=config.frozen_teacher, mesh=mesh)
    mode = "sft" if config.arm == "sft" else "distill"
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, mode=mode, target=target_for(config), loss=LossConfig(**config.loss),
                                 combined_forward=config.combined_forward),
        state, mesh)
    iterator = data_iterator(train_records, config.seed)

    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep, create=True))
    summary_path, metrics_path = workdir / "summary.json", workdir / "metrics.jsonl"
    summary = {"config": config.to_dict(), "eval": {}}
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
        state = restored.state
        iterator.set_state(restored.meta["data"])
        summary = restored.meta["summary"]
        print(f"resumed from step {start} in {workdir}")
    elif config.eval.before:
        summary["eval"]["before"] = evaluate(model, tokenizer, eval_records, **eval_kwargs)

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"{config.arm}", unit="step",
               dynamic_ncols=True)
    for step in bar:
        tick = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(config.seed), step)
        problems = [next(iterator) for _ in range(config.batch_size)]
        records = [r for r in problems for _ in range(samples)]  # each sample gets its own (pCoT, pTeacher) pair
        pairs = [prompt_pair(tokenizer, r, prompt_config) for r in records]
        model = nnx.merge(graphdef, state.params)
        if mode == "sft":
            completions = [tokenizer.encode(r.solution, add_special_tokens=False) + [tokenizer.turn_end_id]
                           for r in records]
            batch = step_lib.build_batch([p[0] for p in pairs], None, completions, pad_id=tokenizer.pad_id)
            reward = float("nan")
        else:
            completions = sample_completions(model, tokenizer, pairs, config, jax.random.fold_in(key, 1))
            completions = [c if c else [tokenizer.turn_end_id] for c in completions]
            batch = step_lib.build_batch([p[0] for p in pairs], [p[1] for p in pairs], completions,
                                         pad_id=tokenizer.pad_id)
            verifiable = [(r, c) for r, c in zip(records, completions, strict=True) if r.answer is not None]
            reward = float(np.mean([extract_answer(tokenizer.decode(c)) == r.answer for r, c in verifiable])
                           ) if verifiable else float("nan")
        if mesh is not None:
            batch = mesh_lib.host_to_global(batch, mesh)
        state, metrics = train_step(state, batch, jax.random.fold_in(key, 2))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - tick
        metrics |= {"step": step + 1, "reward": reward, "seconds": seconds,
                    "tokens_per_s": metrics["generated_tokens"] / seconds}
        with metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{reward:.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        done = step + 1
        if config.eval.every and done % config.eval.every == 0 and done < config.steps:
            model = nnx.merge(graphdef, state.params)
            summary["eval"][f"step {done}"] = evaluate(model, tokenizer, eval_records, **eval_kwargs)
        if done % config.checkpoint.every == 0 or done == config.steps:
            manager.save(done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"data": iterator.get_state(), "summary": summary})))
    manager.wait_until_finished()

    if config.eval.after:
        model = nnx.merge(graphdef, state.params)
        summary["eval"]["after"] = evaluate(model, tokenizer, eval_records, **eval_kwargs)
    summary_path.write_text(json.dumps(summary, indent=1))
    if summary["eval"]:
        table = format_table(summary["eval"])
        (workdir / "summary.md").write_text(f"# {config.arm} on {config.model}\n\n{table}\n")
        print(f"\nheld-out evaluation ({len(eval_records)} problems), {config.arm} arm:\n{table}")
        print(f"\nmetrics: {metrics_path}\nsummary: {workdir / 'summary.md'}")
    return summary
