"""The self-distillation loop: sample genCoT on-policy -> score both contexts -> update.

`run(config)` is what `python -m jaxdistill train --config=...` calls. Arms (config.arm):
- "blend": target (w*teacher + student)/k with entropy-matched k (the method);
- "fixed_k": the same blend with a fixed k (config.fixed_k);
- "teacher": the teacher's logits alone (plain on-policy self-distillation);
- "sft": cross-entropy on the reference solutions (no sampling);
- "rejection_sft": cross-entropy on the sampled genCoT that reach the right answer;
- "stack": KL to the teacher stack's aggregated distribution on the student's own samples
  (config.stack: several frozen teachers, by default with the hint; a sparse top-K target).
config.guided=True samples genCoT from the blended target instead of the student;
config.rollout="teacher" samples it from pTeacher instead (off-policy, teacher-forced).
Controls: config.hint="wrong" shows another problem's solution as the hint, "none" no hint
(pTeacher = pCoT, so the blend equals the student and the loss vanishes).

Everything random derives from (config.seed, step), and the data iterator's position is
saved with each checkpoint, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdistill import mesh as mesh_lib
from jaxdistill import prompts as prompt_lib
from jaxdistill import runs, settings
from jaxdistill.data import load_records
from jaxdistill.data import metrics as metrics_lib
from jaxdistill.distill import step as step_lib
from jaxdistill.distill.config import fit_to_context, prompts_for, trainer, validate
from jaxdistill.distill.evaluate import evaluate, format_table
from jaxdistill.distill.rollouts import (
    data_iterator,
    end_metrics,
    hinted_pairs,
    make_stack,
    sample_completions,
    sample_rows,
    stack_targets,
)
from jaxdistill.errors import ConfigError, DataError
from jaxdistill.models import load
from jaxdistill.models.loading import describe


def run(config) -> dict:
    validate(config)
    if config.get("distributed"):
        mesh_lib.initialize_distributed(**config.distributed)
    return settings.run_in_workdir(config, _train)


def _train(config, workdir) -> dict:
    samples = config.get("samples_per_problem", 1)
    train_records, eval_records = load_records(config.data)
    model_config, tokenizer = describe(config.model)
    limit = config.data.get("max_tokens", 0) or model_config.max_seq_len
    if limit > model_config.max_seq_len:
        raise ConfigError(f"data.max_tokens={limit} exceeds the model's context of {model_config.max_seq_len}.")
    prompt_config = prompts_for(config, train_records)
    try:
        stops, end = prompt_lib.stop_ids(tokenizer, prompt_config), prompt_lib.end_id(tokenizer, prompt_config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    policy = config.data.get("overlong", "error")
    train_records = fit_to_context(train_records, tokenizer, limit, prompt_config, config.sample.max_new_tokens,
                                   policy, "training")
    eval_records = fit_to_context(eval_records, tokenizer, limit, prompt_config, config.eval.max_new_tokens,
                                  policy, "evaluation")
    mesh = mesh_lib.make_mesh(dict(config.mesh)) if config.get("mesh") else None
    if mesh is not None:
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if (config.batch_size * samples) % ways:
            raise ConfigError(f"batch_size x samples_per_problem = {config.batch_size * samples} problems do not "
                              f"split evenly over the mesh's {ways} data-parallel devices (data x fsdp); use a "
                              f"multiple of {ways} or change --config.mesh.")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {config.batch_size} does not split over the {jax.process_count()} processes; "
                          "each process samples its own share of every batch: use a multiple.")
    local = config.batch_size // jax.process_count()  # problems each process samples and scores
    model, tokenizer = load(config.model, dtype=config.dtype, compute_dtype=config.compute_dtype or None,
                            mesh=mesh, remat=config.remat, attention=config.get("attention", "xla"))
    if config.arm == "rejection_sft" and any(r.answer is None for r in train_records):
        raise DataError("arm=rejection_sft keeps the samples that reach the right answer, so every training record "
                        "needs an answer; these records have none. Use arm=sft or a verifiable dataset.")
    eval_kwargs = dict(prompt_config=prompt_config, max_new_tokens=config.eval.max_new_tokens,
                       batch_size=config.eval.batch_size, mean_at_k=config.eval.mean_at_k, mesh=mesh)

    graphdef, state, train_step = trainer(config, model, mesh)
    mode, sft_weight = step_lib.mode_for(config.arm), config.get("sft_weight", 0.0)
    stack = make_stack(config, train_records) if config.arm == "stack" else None
    iterator = data_iterator(train_records, config.seed)
    summary_path = workdir / "summary.json"
    summary = {"config": config.to_dict(), "commit": runs.source_commit(), "eval": {}}

    def evaluated(when: str, model) -> None:  # the table's row, and each problem's outcomes beside it
        row = evaluate(model, tokenizer, eval_records, **eval_kwargs)
        summary.setdefault("per_problem", {})[when] = row.pop("per_problem")  # also in a resumed older summary
        summary["eval"][when] = row

    with runs.Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep,
                          resume_from=config.checkpoint.get("resume_from", 0)) as checkpoints, \
            runs.board(config, workdir) as board:
        restored = checkpoints.restore(state.without_frozen())  # LoRA's base weights come from the model
        start = 0
        if restored is not None:
            start, restored_state, meta = restored
            state = dataclasses.replace(restored_state, frozen_params=state.frozen_params)
            iterator.set_state(meta["data"])
            summary = meta["summary"]
            print(f"resumed from step {start} in {workdir}")
        elif config.eval.before:
            evaluated("before", model)
        board.resume(start)
        metrics_log = runs.MetricsLog(workdir / "metrics.jsonl", resume_step=start, board=board)

        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"{config.arm}",
                   unit="step", dynamic_ncols=True)
        for step in bar:
            tick = time.perf_counter()
            key = jax.random.fold_in(jax.random.key(config.seed), step)
            # Every process reads the same global batch and keeps its own slice of it.
            problems = [next(iterator) for _ in range(config.batch_size)]
            mine = slice(jax.process_index() * local * samples, (jax.process_index() + 1) * local * samples)
            pairs = hinted_pairs(tokenizer, problems, samples, prompt_config, config.get("hint", "reference"))[mine]
            records = [r for r in problems for _ in range(samples)][mine]
            model = step_lib.as_model(graphdef, step_lib.all_params(state))
            rows = {}
            references = ([tokenizer.encode(r.solution, add_special_tokens=False) + [end] for r in records]
                          if config.arm == "sft" or sft_weight else None)
            if config.arm == "sft":
                completions, teacher_prompts = references, None
            else:
                completions = sample_completions(model, tokenizer, pairs, config, jax.random.fold_in(key, 1), mesh,
                                                 stops)
                completions = [c if c else [end] for c in completions]
                rows = sample_rows(tokenizer, records, completions, stops)
                teacher_prompts = None if mode in ("sft", "sparse") else [p[1] for p in pairs]
            student_prompts = [p[0] for p in pairs]
            prompts = student_prompts + (teacher_prompts or [])
            widths = mesh_lib.process_max(step_lib.padded_widths(prompts, completions))  # one shape on every process
            batch = step_lib.build_batch(student_prompts, teacher_prompts, completions, pad_id=tokenizer.pad_id,
                                         end_ids=stops, widths=widths)
            if sft_weight:  # the reference solutions under the student prompt, for the mixed-in cross-entropy
                batch["sft"] = step_lib.build_batch(
                    student_prompts, None, references, pad_id=tokenizer.pad_id, end_ids=stops,
                    widths=mesh_lib.process_max(step_lib.padded_widths(student_prompts, references)))
            if stack is not None:
                batch |= stack_targets(stack, config.stack, records, completions, batch["target_mask"].shape[1])
            if config.arm == "rejection_sft":  # train only on the samples that reach the answer
                correct = rows["reward"] == 1
                batch["target_mask"] &= correct[:, None]
                rows["kept"] = correct.astype(np.float32)
            rows["ended_at_end_token"] = batch["end_mask"].any(axis=1).astype(np.float32)
            rows["wrote_answer_line"] = np.asarray([metrics_lib.has_answer_line(tokenizer.decode(c))
                                                    for c in completions], np.float32)
            rows = {name: mesh_lib.process_concat(values) for name, values in rows.items()}  # the global batch's
            if mesh is not None:
                batch = mesh_lib.host_to_global(batch, mesh)
            state, metrics = train_step(state, batch, jax.random.fold_in(key, 2))
            metrics = jax.device_get(metrics)
            profile = metrics.pop("kl_by_position", None)
            per_sample = {name: metrics.pop(name) for name in ("end_p_student", "end_p_target") if name in metrics}
            ended, answered = rows.pop("ended_at_end_token") > 0, rows.pop("wrote_answer_line") > 0
            metrics = {k: float(v) for k, v in metrics.items()}
            for name, values in rows.items():  # kept: a count; the rest: means over the rows that have a value
                metrics[name] = float(values.sum() if name == "kept" else np.nanmean(values) if
                                      np.isfinite(values).any() else np.nan)
            if profile is not None:
                metrics["kl_by_position"] = [round(float(v), 6) for v in profile]
            if per_sample:
                metrics |= end_metrics(per_sample, ended, answered)
            seconds = time.perf_counter() - tick
            metrics |= {"step": step + 1, "seconds": seconds, "tokens_per_s": metrics["generated_tokens"] / seconds}
            metrics_log.write(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{metrics.get('reward', float('nan')):.2f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            done = step + 1
            if config.eval.every and done % config.eval.every == 0 and done < config.steps:
                model = step_lib.as_model(graphdef, step_lib.all_params(state))
                evaluated(f"step {done}", model)
            if done % config.checkpoint.every == 0 or done == config.steps:
                checkpoints.save(done, state.without_frozen(), {"data": iterator.get_state(), "summary": summary})

        if config.eval.after:
            model = step_lib.as_model(graphdef, step_lib.all_params(state))
            evaluated("after", model)
        if runs.is_writer():
            runs.atomic_write_text(summary_path, json.dumps(summary, indent=1))
            if summary["eval"]:
                table = format_table(summary["eval"])
                runs.atomic_write_text(workdir / "summary.md", f"# {config.arm} on {config.model}\n\n{table}\n")
                print(f"\nheld-out evaluation ({len(eval_records)} problems), {config.arm} arm:\n{table}")
                print(f"\nmetrics: {workdir / 'metrics.jsonl'}, summary: {workdir / 'summary.md'}, "
                      f"tensorboard: {workdir / 'tensorboard'}")
        for when, row in summary["eval"].items():  # held-out metrics at the step they were measured
            at = {"before": 0, "after": config.steps}.get(when)
            board.scalars(row, step=int(when.split()[-1]) if at is None else at, prefix="eval/")
        board.publish(step=config.steps)
    return summary
