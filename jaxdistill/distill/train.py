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
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from jaxdistill import mesh as mesh_lib
from jaxdistill import runs, sampling, settings
from jaxdistill.data import load_records
from jaxdistill.data.records import Record, answer_matches
from jaxdistill.distill import prompts as prompt_lib
from jaxdistill.distill import step as step_lib
from jaxdistill.distill.losses import LossConfig, TargetConfig
from jaxdistill.distill.prompts import PromptConfig, prompt_pair
from jaxdistill.distill.targets import blend_logits
from jaxdistill.errors import ConfigError, DataError, RunError
from jaxdistill.eval import metrics as metrics_lib
from jaxdistill.eval.harness import evaluate, format_table
from jaxdistill.models import load
from jaxdistill.models.attention import IMPLEMENTATIONS
from jaxdistill.models.loading import describe

ARMS = ("blend", "fixed_k", "teacher", "sft", "rejection_sft", "stack")
HINTS = ("reference", "wrong", "none")  # what pTeacher shows (config.hint)
ROLLOUTS = ("student", "teacher")  # which context samples genCoT (config.rollout)
OVERLONG = ("error", "skip")  # what to do with records longer than the context (data.overlong)
ATTENTION = IMPLEMENTATIONS  # the attention kernel (config.attention)


@dataclasses.dataclass(frozen=True)
class GuidedRule:
    """Guided sampling over paired rows, as in the train batch: row 2i is problem i's student
    context, row 2i+1 its teacher context; both rows get the token sampled from the blend."""

    teacher_weight: float = 0.75
    temperature: float = 1.0
    fixed_k: float | None = None

    def __call__(self, logits, keys, step):
        student, teacher = step_lib.split_contexts(logits)
        target = blend_logits(teacher, student, self.teacher_weight, self.fixed_k)
        token = jax.vmap(jax.random.categorical)(keys[0::2], target / self.temperature)  # the student row's key
        return jnp.repeat(token, 2).astype(jnp.int32)


def load_trained(workdir, *, mesh=None):
    """The model a finished training run ends with (its last checkpoint) and its tokenizer:
    `models.load(workdir)` comes here, so a run's output can be sampled, evaluated, trained
    further or stacked as a teacher by naming its work directory."""
    import ml_collections

    from jaxdistill.models.loading import training_run

    directory = epath.Path(os.path.abspath(os.path.expanduser(str(workdir))))
    run = training_run(directory)
    if run is None:
        raise RunError(f"{directory} has no summary.json and checkpoints: not a finished jaxdistill training run "
                       "(finish or resume it with the same --config.workdir first).")
    config = ml_collections.ConfigDict(run)
    model, tokenizer = load(config.model, dtype=config.dtype, compute_dtype=config.compute_dtype or None,
                            mesh=mesh, attention=config.get("attention", "xla"))
    tx = step_lib.make_optimizer(step_lib.OptimConfig(**config.optim, total_steps=config.steps))
    graphdef, state = step_lib.init_state(model, tx, frozen_teacher=config.frozen_teacher)
    with runs.Checkpoints(directory / "checkpoints", keep=config.checkpoint.keep) as checkpoints:
        restored = checkpoints.restore(state)
    if restored is None:
        raise RunError(f"{directory / 'checkpoints'} holds no checkpoint.")
    return nnx.merge(graphdef, restored[1].params), tokenizer


def target_for(config) -> TargetConfig:
    if config.arm == "teacher":
        return TargetConfig(kind="teacher")
    return TargetConfig(kind="blend", teacher_weight=config.teacher_weight,
                        temperature=config.fixed_k if config.arm == "fixed_k" else None)


def prompts_for(config, train_records: list[Record]) -> PromptConfig:
    """The prompt settings (config.prompts); fewshot takes its worked examples from the first
    training records."""
    settings = dict(config.get("prompts") or {})
    examples = settings.pop("fewshot_examples", 0)
    try:
        prompts = PromptConfig(**settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.prompts: {err}") from None
    if prompts.style == "fewshot":
        prompts = dataclasses.replace(prompts, examples=tuple((r.problem, r.solution)
                                                              for r in train_records[:examples]))
    return prompts


def data_iterator(records, seed: int):
    """An endless, seeded, reshuffled stream of records whose position can be saved."""
    epochs = 10_000  # finite so grain can shuffle across the whole index space
    return iter(grain.MapDataset.source(records).repeat(epochs).shuffle(seed=seed).to_iter_dataset())


def hinted_pairs(tokenizer, problems: list[Record], samples: int, prompt_config: PromptConfig,
                 hint: str = "reference") -> list[tuple[list[int], list[int]]]:
    """(pCoT, pTeacher) token ids for each row: `samples` rows per problem.

    hint "reference" is the method; "wrong" shows the next problem's solution instead (a
    control: a hint that does not fit); "none" makes pTeacher the plain pCoT (a control whose
    loss must vanish).
    """
    pairs = []
    for i, record in enumerate(problems):
        student, teacher = prompt_pair(tokenizer, record, prompt_config)
        if hint == "wrong":
            other = problems[(i + 1) % len(problems)]
            teacher = prompt_pair(tokenizer, dataclasses.replace(record, solution=other.solution), prompt_config)[1]
        elif hint == "none":
            teacher = student
        pairs += [(student, teacher)] * samples
    return pairs


def sample_completions(model, tokenizer, pairs, config, key, mesh=None, stops=None):
    """genCoT for each row: on-policy from pCoT, from pTeacher (rollout="teacher"), or guided by
    the blend of both contexts."""
    s = config.sample
    common = dict(max_new_tokens=s.max_new_tokens, rng=key, eos_ids=stops or tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                  mesh=mesh)
    if config.guided:
        rule = GuidedRule(config.teacher_weight, s.temperature, config.fixed_k if config.arm == "fixed_k" else None)
        out = sampling.generate(model, [prompt for pair in pairs for prompt in pair], rule=rule, **common)
        return out.sequences()[0::2]  # the student rows
    context = 1 if config.get("rollout", "student") == "teacher" else 0
    out = sampling.generate(model, [p[context] for p in pairs],
                            rule=sampling.Sample(s.temperature, s.top_k, s.top_p), **common)
    return out.sequences()


def sample_rows(tokenizer, records: list[Record], completions: list[list[int]], stops=None) -> dict[str, np.ndarray]:
    """What each sampled genCoT looks like: reward (NaN without an answer), length, whether it
    ended and wrote its answer line, how much it copies the reference solution and the
    problem (word 4-gram overlap, longest common substring)."""
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    pairs = list(zip(records, texts, strict=True))
    rows = {
        "reward": [float(answer_matches(t, r.answer)) if r.answer is not None else np.nan for r, t in pairs],
        "length": [len(c) for c in completions],
        "ended": [c[-1] in (stops or tokenizer.eos_ids) for c in completions],
        "answer_line": [metrics_lib.has_answer_line(t) for t in texts],
        "copy_solution_4gram": [metrics_lib.ngram_overlap(t, r.solution) for r, t in pairs],
        "copy_problem_4gram": [metrics_lib.ngram_overlap(t, r.problem) for r, t in pairs],
        "copy_solution_lcs": [metrics_lib.longest_common_substring(t, r.solution) for r, t in pairs],
    }
    return {name: np.asarray(values, np.float32) for name, values in rows.items()}


def make_stack(config, train_records):
    """The frozen teacher stack of arm "stack", decoding in the student's vocabulary."""
    from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block

    c = config.stack
    teachers = [TeacherConfig.from_config(t) for t in c.teachers]
    return TeacherStack(teachers, pivot=config.model, width=c.width, dtype=config.dtype, hint=c.hint,
                        fewshot=fewshot_block(train_records[: c.fewshot_examples]),
                        fewshot_ends_turn=c.get("fewshot_ends_turn", False))


def stack_targets(stack, c, records, completions, width: int) -> dict[str, np.ndarray]:
    """The stack's aggregated top-K at every completion position, padded to the batch's width."""
    from jaxdistill.teachers import aggregate as agg_lib

    out = stack.score(records, completions, aggregate=agg_lib.rule_from_config(c.rule), top_k=c.top_k,
                      record_top=c.record_top)
    ids = np.zeros((len(records), width, c.record_top), np.int32)
    logprobs = np.full((len(records), width, c.record_top), -np.inf, np.float32)
    n = out.top_ids.shape[1]
    ids[:, :n], logprobs[:, :n] = out.top_ids, out.top_logprobs
    return {"target_ids": ids, "target_logprobs": logprobs}


def end_metrics(stats, ended: np.ndarray, answered: np.ndarray) -> dict[str, float]:
    """Student and target probability of the end token where samples ended (`ended` [B]), overall
    and split by whether the sample wrote its '#### <answer>' line (`answered` [B])."""
    out = {}
    for suffix, rows in (("", ended), ("_answered", ended & answered), ("_unanswered", ended & ~answered)):
        for name in ("end_p_student", "end_p_target"):
            out[name + suffix] = float(np.asarray(stats[name])[rows].mean()) if rows.any() else float("nan")
    return out


DISTILL_ARMS = ("blend", "fixed_k", "teacher")  # the arms with a self-teacher (hint, frozen teacher)


def _only(what: str, key: str, value: str):
    return lambda c: f"only {what} reads it and {key} is {settings.get(c, key)!r}; add --config.{key}={value}"


def _arms(arms: tuple, what: str):
    return lambda c: f"arm={c.arm!r} does not read it ({what}: {', '.join(arms)})"


# Settings that only some sources, arms or kinds read, with their unset values: changing one that the
# run would not read is an error (settings.check_unused), not a silent no-op.
UNUSED = (
    *(settings.Unused(f"data.{key}", "", lambda c: c.data.source == "jsonl", _only("data.source=jsonl",
                                                                                   "data.source", "jsonl"))
      for key in ("train_path", "eval_path")),
    *(settings.Unused(f"data.{key}", unset, lambda c: c.data.source == "tfds",
                      _only("data.source=tfds", "data.source", "tfds"))
      for key, unset in (("tfds_data_dir", ""), ("tfds_name", "gsm8k"))),
    *(settings.Unused(f"data.{key}", unset, lambda c: c.data.source == "synthetic",
                      _only("data.source=synthetic", "data.source", "synthetic"))
      for key, unset in (("steps", 1), ("max_start", 20), ("max_operand", 12))),
    settings.Unused("fixed_k", 1.75, lambda c: c.arm == "fixed_k", _only("arm=fixed_k", "arm", "fixed_k")),
    settings.Unused("teacher_weight", 0.75, lambda c: c.arm in ("blend", "fixed_k"),
                    _arms(("blend", "fixed_k"), "the blended targets")),
    *(settings.Unused(key, unset, lambda c: c.arm in DISTILL_ARMS, _arms(DISTILL_ARMS, "the self-teacher arms"))
      for key, unset in (("hint", "reference"), ("frozen_teacher", False), ("combined_forward", True))),
    *(settings.Unused(key, unset, lambda c: c.arm != "sft", lambda c: "arm='sft' samples nothing")
      for key, unset in (("rollout", "student"), ("guided", False), ("sample.temperature", 0.7),
                         ("sample.top_k", 0), ("sample.top_p", 1.0))),
    settings.Unused("loss.jsd_beta", 0.5, lambda c: c.loss.kind == "jsd", _only("loss.kind=jsd", "loss.kind", "jsd")),
    settings.Unused("prompts.fewshot_examples", 2, lambda c: c.prompts.style == "fewshot",
                    _only("prompts.style=fewshot", "prompts.style", "fewshot")),
    *(settings.Unused(f"stack.{key}", unset, lambda c: c.arm == "stack", _only("arm=stack", "arm", "stack"))
      for key, unset in (("hint", True), ("rule", "mean_probs"), ("top_k", 10), ("record_top", 20), ("width", 2),
                         ("fewshot_examples", 2), ("fewshot_ends_turn", False))),
)


def validate(config) -> None:
    """Every setting that can be checked without data or a model, checked before any work."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(bool(config.model), "no model: pass --config.model=NAME_OR_PATH (a built-in name, a .gguf file or a "
         "Hugging Face directory).")
    need(config.arm in ARMS, f"arm {config.arm!r} is not one of {ARMS}.")
    samples = config.get("samples_per_problem", 1)
    need(config.get("hint", "reference") in HINTS, f"hint {config.get('hint')!r} is not one of {HINTS}.")
    need(config.get("rollout", "student") in ROLLOUTS, f"rollout {config.get('rollout')!r} is not one of {ROLLOUTS}.")
    need(config.get("hint", "reference") != "wrong" or config.batch_size >= 2,
         "hint=wrong shows another problem's solution from the same batch: batch_size must be >= 2.")
    need(not (config.guided and config.get("rollout", "student") == "teacher"),
         "guided=True and rollout=teacher both choose where genCoT comes from; set one of them.")
    need(samples >= 1 and (config.arm != "sft" or samples == 1),
         f"samples_per_problem must be >= 1 (and 1 for the sft arm, which samples nothing), got {samples}.")
    need(config.steps >= 1, f"steps must be >= 1, got {config.steps}.")
    warmup = config.optim.warmup_steps
    need(0 <= warmup < config.steps, f"optim.warmup_steps ({warmup}) must be below steps ({config.steps}): the "
         "learning rate warms up, then decays over the remaining steps. Lower --config.optim.warmup_steps or raise "
         "--config.steps.")
    need(config.optim.lr > 0, f"optim.lr must be > 0, got {config.optim.lr}.")
    sft_weight = config.get("sft_weight", 0.0)
    need(sft_weight >= 0, f"sft_weight must be >= 0, got {sft_weight}.")
    need(not sft_weight or config.arm in ("blend", "fixed_k", "teacher"),
         f"sft_weight mixes cross-entropy on the references into a distillation loss; arm={config.arm!r} has none "
         "(use arm=blend, fixed_k or teacher, or arm=sft for cross-entropy alone).")
    need(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}.")
    need(config.sample.max_new_tokens >= 1, f"sample.max_new_tokens must be >= 1, got {config.sample.max_new_tokens}.")
    need(config.sample.temperature > 0, f"sample.temperature must be > 0 for on-policy sampling, got "
         f"{config.sample.temperature}.")
    need(config.checkpoint.every >= 1 and config.checkpoint.keep >= 1,
         "checkpoint.every and checkpoint.keep must be >= 1.")
    e = config.eval
    need(e.max_new_tokens >= 1 and e.batch_size >= 1 and e.mean_at_k >= 0,
         "eval.max_new_tokens and eval.batch_size must be >= 1, eval.mean_at_k >= 0.")
    need(config.data.get("overlong", "error") in OVERLONG,
         f"data.overlong must be one of {OVERLONG}, got {config.data.get('overlong')!r}.")
    need(config.data.get("max_tokens", 0) >= 0, "data.max_tokens must be >= 0 (0: the model's context).")
    need(config.get("attention", "xla") in ATTENTION,
         f"attention {config.get('attention')!r} is not one of {ATTENTION} (models/attention.py).")
    try:
        LossConfig(**config.loss)
        target_for(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    style = (config.get("prompts") or {}).get("style", "chat")
    need(style in ("chat", "fewshot"), f"prompts.style must be 'chat' or 'fewshot', got {style!r}.")
    if config.arm == "stack":
        from jaxdistill.teachers.aggregate import RULES
        from jaxdistill.teachers.stack import TeacherConfig, validate_teachers

        c = config.get("stack")
        need(c is not None and c.teachers, "arm=stack needs config.stack.teachers (see experiments/self_distill/"
             "default.py).")
        validate_teachers([TeacherConfig.from_config(t) for t in c.teachers])
        need(config.model in {t["model"] for t in c.teachers},
             f"arm=stack decodes in the student's vocabulary, so one teacher must use the student's model "
             f"{config.model!r}.")
        need(c.rule in RULES, f"stack.rule {c.rule!r} is not one of {sorted(RULES)}.")
        need(c.record_top >= 1 and c.top_k >= 0, "stack.record_top must be >= 1 and stack.top_k >= 0.")
    settings.check_unused(config, UNUSED)


def fit_to_context(records: list[Record], tokenizer, limit: int, prompt_config: PromptConfig, new_tokens: int,
                   policy: str, what: str) -> list[Record]:
    """The records whose longest sequence fits in `limit` tokens; the others are an error, or
    (policy "skip") left out with a printed count. The longest sequence of a record is its
    teacher prompt plus the larger of `new_tokens` and its tokenised solution (the SFT target
    and the hint-uplift score)."""
    too_long = []
    for record in records:
        prompt = max(len(p) for p in prompt_pair(tokenizer, record, prompt_config))
        solution = len(tokenizer.encode(record.solution, add_special_tokens=False)) + 1
        if prompt + max(new_tokens, solution) > limit:
            too_long.append((record, prompt + max(new_tokens, solution)))
    if not too_long:
        return records
    record, length = max(too_long, key=lambda pair: pair[1])
    if policy == "error":
        raise DataError(
            f"{len(too_long)} of {len(records)} {what} records do not fit in {limit} tokens (the longest, "
            f"{record.uid}, needs {length}: prompt with hint plus {new_tokens} generated tokens or its solution). "
            "Shorten them, raise data.max_tokens up to the model's context, or pass --config.data.overlong=skip "
            "to leave them out.")
    print(f"data.overlong=skip: left out {len(too_long)} of {len(records)} {what} records longer than {limit} "
          f"tokens (longest: {record.uid}, {length} tokens).", flush=True)
    kept = [r for r in records if r not in {r for r, _ in too_long}]
    if not kept:
        raise DataError(f"every {what} record is longer than {limit} tokens; nothing is left to use.")
    return kept


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

    optim = step_lib.OptimConfig(**config.optim, total_steps=config.steps)
    tx = step_lib.make_optimizer(optim)
    graphdef, state = step_lib.init_state(model, tx, frozen_teacher=config.frozen_teacher)
    mode = step_lib.mode_for(config.arm)
    sft_weight = config.get("sft_weight", 0.0)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, mode=mode, target=target_for(config), loss=LossConfig(**config.loss),
                                 combined_forward=config.combined_forward, sft_weight=sft_weight),
        state, mesh, sparse_target=mode == "sparse", sft_rows=bool(sft_weight))
    stack = make_stack(config, train_records) if config.arm == "stack" else None
    iterator = data_iterator(train_records, config.seed)
    summary_path = workdir / "summary.json"
    summary = {"config": config.to_dict(), "eval": {}}

    with runs.Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep,
                          resume_from=config.checkpoint.get("resume_from", 0)) as checkpoints:
        restored = checkpoints.restore(state)
        start = 0
        if restored is not None:
            start, state, meta = restored
            iterator.set_state(meta["data"])
            summary = meta["summary"]
            print(f"resumed from step {start} in {workdir}")
        elif config.eval.before:
            summary["eval"]["before"] = evaluate(model, tokenizer, eval_records, **eval_kwargs)
        metrics_log = runs.MetricsLog(workdir / "metrics.jsonl", resume_step=start)

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
            model = nnx.merge(graphdef, state.params)
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
                model = nnx.merge(graphdef, state.params)
                summary["eval"][f"step {done}"] = evaluate(model, tokenizer, eval_records, **eval_kwargs)
            if done % config.checkpoint.every == 0 or done == config.steps:
                checkpoints.save(done, state, {"data": iterator.get_state(), "summary": summary})

    if config.eval.after:
        model = nnx.merge(graphdef, state.params)
        summary["eval"]["after"] = evaluate(model, tokenizer, eval_records, **eval_kwargs)
    if runs.is_writer():
        runs.atomic_write_text(summary_path, json.dumps(summary, indent=1))
        if summary["eval"]:
            table = format_table(summary["eval"])
            runs.atomic_write_text(workdir / "summary.md", f"# {config.arm} on {config.model}\n\n{table}\n")
            print(f"\nheld-out evaluation ({len(eval_records)} problems), {config.arm} arm:\n{table}")
            print(f"\nmetrics: {workdir / 'metrics.jsonl'}\nsummary: {workdir / 'summary.md'}")
    return summary
