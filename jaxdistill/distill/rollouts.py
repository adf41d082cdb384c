"""Rollouts of self-distillation: the (pCoT, pTeacher) prompt pairs of a batch, on-policy (or
guided, or teacher-context) samples of genCoT, what each sample looks like (reward, length,
end, copying), and the teacher stack's sparse targets for arm "stack"."""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import sampling
from jaxdistill.data import metrics as metrics_lib
from jaxdistill.data.records import Record, answer_matches
from jaxdistill.distill import step as step_lib
from jaxdistill.distill.targets import blend_logits
from jaxdistill.prompts import PromptConfig, prompt_pair


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


