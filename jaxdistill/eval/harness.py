"""Held-out evaluation of self-distillation: accuracy, mean@k, hint uplift, KL, entropy, length.

- accuracy: greedy exact match of the extracted answer, from pCoT (and from pTeacher);
- mean@k: mean exact match over k temperature samples per problem from pCoT;
- hint uplift: mean per-token log-prob of the reference solution under pTeacher minus
  under pCoT (how much the hint helps the model predict the solution);
- on the student's greedy responses: teacher-student KL(teacher || student) per token,
  the student's entropy per token, the response length, the fraction that end before the
  length cap, the fraction with a '#### <answer>' line, and how much they copy the
  reference solution (word 4-gram overlap; the student never sees it, so this measures
  what training moved into the student's own prompt).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import sampling
from jaxdistill.data.records import Record, extract_answer
from jaxdistill.distill.prompts import PromptConfig, prompt_pair
from jaxdistill.distill.step import build_batch, completion_columns, split_contexts
from jaxdistill.eval import metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def _score(graphdef, params, tokens, mask, target_mask):
    """Per generated token [B, G]: log-prob under student and teacher context, KL(t||s), student entropy."""
    model = nnx.merge(graphdef, params)
    region = completion_columns({"tokens": tokens, "target_mask": target_mask})
    hidden = model.hidden_states(tokens, None, mask)[0][:, region]
    labels = split_contexts(tokens)[0][:, region.start + 1 : region.stop + 1]

    def column(args):
        h, y = args  # [2B, D], [B]
        s, t = split_contexts(jax.nn.log_softmax(model.logits(h)))
        pick = lambda lp: jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0]  # noqa: E731
        kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
        ent = -jnp.sum(jnp.exp(s) * s, axis=-1)
        return pick(s), pick(t), kl, ent

    out = jax.lax.map(column, (hidden.swapaxes(0, 1), labels.swapaxes(0, 1)))
    return tuple(x.swapaxes(0, 1) for x in out)


def score_completions(model, tokenizer, pairs, completions):
    """Per-problem means of the _score quantities over each completion's tokens.

    pairs: the (pCoT, pTeacher) token ids of each problem, as `prompt_pair` returns them.
    """
    graphdef, params = nnx.split(model)
    batch = build_batch([p[0] for p in pairs], [p[1] for p in pairs], completions, pad_id=tokenizer.pad_id)
    logp_s, logp_t, kl, ent = (np.asarray(x) for x in _score(graphdef, params, batch["tokens"], batch["mask"],
                                                              batch["target_mask"]))
    m = batch["target_mask"]
    mean = lambda x: (x * m).sum(1) / m.sum(1)  # noqa: E731
    return {"logp_student": mean(logp_s), "logp_teacher": mean(logp_t), "kl": mean(kl), "entropy": mean(ent)}


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate(model, tokenizer, records: list[Record], *, prompt_config: PromptConfig = PromptConfig(),
             max_new_tokens: int = 96, batch_size: int = 32, mean_at_k: int = 0, temperature: float = 1.0,
             seed: int = 0) -> dict[str, float]:
    """One row of the before/after table."""
    gen = functools.partial(sampling.generate, model, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids,
                            pad_id=tokenizer.pad_id)
    verifiable = [r for r in records if r.answer is not None]
    correct = {"student": [], "teacher": []}
    stats = {"kl": [], "entropy": [], "length": [], "uplift": [], "ended": [], "answer_line": [], "copy": []}
    for chunk in _batches(records, batch_size):
        pairs = [prompt_pair(tokenizer, r, prompt_config) for r in chunk]
        student = gen([p[0] for p in pairs]).sequences()
        teacher = gen([p[1] for p in pairs]).sequences()
        for r, s, t in zip(chunk, student, teacher, strict=True):
            if r.answer is not None:
                correct["student"].append(extract_answer(tokenizer.decode(s)) == r.answer)
                correct["teacher"].append(extract_answer(tokenizer.decode(t)) == r.answer)
        nonempty = [(pair, s) for pair, s in zip(pairs, student, strict=True) if s]
        if nonempty:
            scored = score_completions(model, tokenizer, [p for p, _ in nonempty], [s for _, s in nonempty])
            stats["kl"] += scored["kl"].tolist()
            stats["entropy"] += scored["entropy"].tolist()
        stats["length"] += [len(s) for s in student]
        stats["ended"] += [bool(s) and s[-1] in tokenizer.eos_ids for s in student]
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in student]
        stats["answer_line"] += [metrics.has_answer_line(t) for t in texts]
        stats["copy"] += [metrics.ngram_overlap(t, r.solution) for r, t in zip(chunk, texts, strict=True)]
        solutions = [tokenizer.encode(r.solution, add_special_tokens=False) for r in chunk]
        ref = score_completions(model, tokenizer, pairs, solutions)
        stats["uplift"] += (ref["logp_teacher"] - ref["logp_student"]).tolist()
    row = {
        "accuracy": float(np.mean(correct["student"])) if verifiable else float("nan"),
        "accuracy_teacher": float(np.mean(correct["teacher"])) if verifiable else float("nan"),
        "hint_uplift_logp": float(np.mean(stats["uplift"])),
        "kl_teacher_student": float(np.mean(stats["kl"])) if stats["kl"] else float("nan"),
        "entropy": float(np.mean(stats["entropy"])) if stats["entropy"] else float("nan"),
        "length": float(np.mean(stats["length"])),
        "ended": float(np.mean(stats["ended"])),
        "answer_line": float(np.mean(stats["answer_line"])),
        "copy_solution_4gram": float(np.mean(stats["copy"])),
    }
    if mean_at_k and verifiable:
        rule = sampling.Sample(temperature)
        hits = []
        for chunk in _batches(verifiable, max(batch_size // mean_at_k, 1)):
            prompts = [prompt_pair(tokenizer, r, prompt_config)[0] for r in chunk for _ in range(mean_at_k)]
            out = gen(prompts, rule=rule, rng=seed).sequences()
            hits += [extract_answer(tokenizer.decode(s)) == r.answer
                     for s, r in zip(out, [r for r in chunk for _ in range(mean_at_k)], strict=True)]
        row[f"mean@{mean_at_k}"] = float(np.mean(hits))
    return row


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per label (e.g. before/after), one column per metric."""
    columns = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    return "\n".join(lines)
