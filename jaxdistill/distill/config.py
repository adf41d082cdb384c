"""The self-distillation job's settings: what each arm and control means for the target and
the prompts, every check that needs no data or model (`validate`, including the settings an
arm or source would not read), and fitting records to the model's context."""

from __future__ import annotations

import dataclasses

from jaxdistill import settings
from jaxdistill.data.records import Record
from jaxdistill.distill.losses import LossConfig, TargetConfig
from jaxdistill.errors import ConfigError, DataError
from jaxdistill.models.attention import IMPLEMENTATIONS
from jaxdistill.models.lora import LoraConfig
from jaxdistill.prompts import PromptConfig, prompt_pair

ARMS = ("blend", "fixed_k", "teacher", "sft", "rejection_sft", "stack")
HINTS = ("reference", "wrong", "none")  # what pTeacher shows (config.hint)
ROLLOUTS = ("student", "teacher")  # which context samples genCoT (config.rollout)
OVERLONG = ("error", "skip")  # what to do with records longer than the context (data.overlong)
ATTENTION = IMPLEMENTATIONS  # the attention kernel (config.attention)


def target_for(config) -> TargetConfig:
    if config.arm == "teacher":
        return TargetConfig(kind="teacher")
    return TargetConfig(kind="blend", teacher_weight=config.teacher_weight,
                        temperature=config.fixed_k if config.arm == "fixed_k" else None)


def trainer(config, model, mesh):
    """What `train` runs and `compile` compiles: (graphdef, train state, jitted step) around `model`,
    which first gets the adapters of `config.lora` (rank 0: none; then every weight trains)."""
    from jaxdistill.distill import step as step_lib
    from jaxdistill.models.lora import add_lora

    lora = LoraConfig.from_config(config.get("lora"))
    if lora is not None:
        add_lora(model, lora, seed=config.seed)
    tx = step_lib.make_optimizer(step_lib.OptimConfig(**config.optim, total_steps=config.steps))
    graphdef, state = step_lib.init_state(model, tx, frozen_teacher=config.frozen_teacher)
    mode = step_lib.mode_for(config.arm)
    sft_weight = config.get("sft_weight", 0.0)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, mode=mode, target=target_for(config), loss=LossConfig(**config.loss),
                                 combined_forward=config.combined_forward, sft_weight=sft_weight,
                                 base_teacher=lora is not None and config.frozen_teacher),
        state, mesh, sparse_target=mode == "sparse", sft_rows=bool(sft_weight))
    return graphdef, state, train_step


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
    *(settings.Unused(f"lora.{key}", unset, lambda c: (c.get("lora") or {}).get("rank", 0) > 0,
                      _only("LoRA", "lora.rank", "8"))
      for key, unset in (("alpha", 16.0), ("dropout", 0.0),
                         ("targets", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))),
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
    rank = (config.get("lora") or {}).get("rank", 0)
    need(rank >= 0, f"lora.rank must be >= 0 (0: no LoRA), got {rank}.")
    try:
        LossConfig(**config.loss)
        target_for(config)
        LoraConfig.from_config(config.get("lora"))
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


