"""Held-out evaluation of self-distillation: accuracy, mean@k, hint uplift, KL, entropy, length.

- accuracy: greedy exact match of the extracted answer, from pCoT (and from pTeacher);
- mean@k: mean exact match over k temperature samples per problem from pCoT;
- hint uplift: mean per-token log-prob of the reference solution under pTeacher minus
  under pCoT (how much the hint helps the model predict the solution);
- on the student's greedy responses: teacher-student KL(teacher || student) per token,
  the student's entropy per token, the response length, the fraction that end before the
  length cap, the fraction with a '#### <answer>' line, and how much they copy the
  reference solution (word 4-gram overlap; the student never sees it, so this measures
  what training moved into the student's own prompt);
- reference_logp: the mean per-token log-prob of the reference solution under pCoT (for
  conversations: of the reply the user accepted, held out);
- constraints (records with checks, e.g. synthetic conversations): the fraction of the
  student's greedy replies that meet every constraint of their request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxdistill import mesh as mesh_lib
from jaxdistill import sampling
from jaxdistill.data import metrics
from jaxdistill.data.records import Record, answer_matches
from jaxdistill.distill.step import build_batch, completion_columns, padded_widths, split_contexts
from jaxdistill.prompts import PromptConfig, end_id, prompt_pair, stop_ids


@functools.partial(jax.jit, static_argnames="graphdef")
def score_program(graphdef, params, tokens, mask, target_mask):
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


def score_completions(model, tokenizer, pairs, completions, mesh=None):
    """Per-problem means of the score_program quantities over each completion's tokens.

    pairs: the (pCoT, pTeacher) token ids of each problem, as `prompt_pair` returns them.
    With a mesh, rows are split over its batch axes (in a multi-process run, these are this
    process's rows; every process calls with the same number of them).
    """
    graphdef, params = nnx.split(model)
    n = len(pairs)
    if mesh is not None:  # rows split evenly over this process's devices: repeat the last row to fill
        extra = -n % mesh_lib.batch_rows_per_process(mesh)
        pairs, completions = list(pairs) + [pairs[-1]] * extra, list(completions) + [completions[-1]] * extra
    prompts = [p for pair in pairs for p in pair]
    widths = mesh_lib.process_max(padded_widths(prompts, completions)) if mesh is not None else None
    batch = build_batch([p[0] for p in pairs], [p[1] for p in pairs], completions, pad_id=tokenizer.pad_id,
                        widths=widths)
    arrays = [batch[k] for k in ("tokens", "mask", "target_mask")]
    if mesh is not None:
        arrays = mesh_lib.host_to_global(arrays, mesh)
    to_host = np.asarray if mesh is None else (lambda x: mesh_lib.global_to_local(x, mesh))  # noqa: E731
    logp_s, logp_t, kl, ent = (to_host(x)[:n] for x in score_program(graphdef, params, *arrays))
    m = batch["target_mask"][:n]
    mean = lambda x: (x * m).sum(1) / m.sum(1)  # noqa: E731
    return {"logp_student": mean(logp_s), "logp_teacher": mean(logp_t), "kl": mean(kl), "entropy": mean(ent)}


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _share(items: list, mesh) -> tuple[list, np.ndarray]:
    """This process's equal share of `items` (the last item repeated to even it out) and which
    of its entries are real; the whole list on a single process."""
    if mesh is None or jax.process_count() == 1:
        return items, np.ones(len(items), bool)
    count, index = jax.process_count(), jax.process_index()
    size = -(-len(items) // count)
    mine = items[index * size : (index + 1) * size]
    real = np.arange(size) < len(mine)
    return mine + [items[-1]] * (size - len(mine)), real


PER_PROBLEM = ("correct", "correct_teacher", "length", "ended", "constraints", "reference_logp")


def evaluate(model, tokenizer, records: list[Record], *, prompt_config: PromptConfig = PromptConfig(),
             max_new_tokens: int = 96, batch_size: int = 32, mean_at_k: int = 0, temperature: float = 1.0,
             seed: int = 0, mesh=None) -> dict[str, float]:
    """One row of the before/after table, and under "per_problem" each record's outcomes.

    With a mesh, rows are split over its batch axes; in a multi-process run each process
    evaluates its share of the records and the row is computed over all of them.
    """
    stops = stop_ids(tokenizer, prompt_config)
    gen = functools.partial(sampling.generate, model, max_new_tokens=max_new_tokens, eos_ids=stops,
                            pad_id=tokenizer.pad_id, mesh=mesh)
    mine, real = _share(records, mesh)
    per_record = {name: [] for name in ("correct", "correct_teacher", "kl", "entropy", "length", "ended",
                                        "answer_line", "copy", "uplift", "constraints", "reference_logp")}
    bar = tqdm(total=len(mine), desc="held-out eval", unit="record", leave=False, dynamic_ncols=True)
    for chunk in _batches(mine, batch_size):
        pairs = [prompt_pair(tokenizer, r, prompt_config) for r in chunk]
        student = gen([p[0] for p in pairs]).sequences()
        teacher = gen([p[1] for p in pairs]).sequences()
        nan_if_open = lambda r, ok: float(ok) if r.answer is not None else np.nan  # noqa: E731
        per_record["correct"] += [nan_if_open(r, answer_matches(tokenizer.decode(s), r.answer))
                                  for r, s in zip(chunk, student, strict=True)]
        per_record["correct_teacher"] += [nan_if_open(r, answer_matches(tokenizer.decode(t), r.answer))
                                          for r, t in zip(chunk, teacher, strict=True)]
        # Every row is scored (an empty response as a lone end token, left out of the means), so
        # every process makes the same calls.
        scored = score_completions(model, tokenizer, pairs, [s or [end_id(tokenizer, prompt_config)] for s in student],
                                   mesh)
        per_record["kl"] += [k if s else np.nan for k, s in zip(scored["kl"].tolist(), student, strict=True)]
        per_record["entropy"] += [e if s else np.nan for e, s in zip(scored["entropy"].tolist(), student,
                                                                      strict=True)]
        per_record["length"] += [len(s) for s in student]
        per_record["ended"] += [bool(s) and s[-1] in stops for s in student]
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in student]
        per_record["answer_line"] += [metrics.has_answer_line(t) for t in texts]
        per_record["copy"] += [metrics.ngram_overlap(t, r.solution) for r, t in zip(chunk, texts, strict=True)]
        per_record["constraints"] += [float(metrics.passes_checks(t, r.checks)) if r.checks else np.nan
                                      for r, t in zip(chunk, texts, strict=True)]
        solutions = [tokenizer.encode(r.solution, add_special_tokens=False) for r in chunk]
        ref = score_completions(model, tokenizer, pairs, solutions, mesh)
        per_record["uplift"] += (ref["logp_teacher"] - ref["logp_student"]).tolist()
        per_record["reference_logp"] += ref["logp_student"].tolist()
        bar.update(len(chunk))
    bar.close()
    real = mesh_lib.process_concat(real) if mesh is not None else real

    def everyone(name):  # every record's value, over all processes, without the padding rows
        values = np.asarray(per_record[name], np.float64)
        return (mesh_lib.process_concat(values) if mesh is not None else values)[real]

    def mean(name):
        values = everyone(name)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    row = {"accuracy": mean("correct"), "accuracy_teacher": mean("correct_teacher"),
           "hint_uplift_logp": mean("uplift"), "kl_teacher_student": mean("kl"), "entropy": mean("entropy"),
           "length": mean("length"), "ended": mean("ended"), "answer_line": mean("answer_line"),
           "copy_solution_4gram": mean("copy"), "reference_logp": mean("reference_logp")}
    if any(r.checks for r in records):  # constraint satisfaction, for records that carry checks
        row["constraints"] = mean("constraints")
    verifiable = [r for r in records if r.answer is not None]
    if mean_at_k and verifiable:
        rule = sampling.Sample(temperature)
        mine, real = _share(verifiable, mesh)
        hits = []
        for chunk in _batches(mine, max(batch_size // mean_at_k, 1)):
            prompts = [prompt_pair(tokenizer, r, prompt_config)[0] for r in chunk for _ in range(mean_at_k)]
            out = gen(prompts, rule=rule, rng=seed).sequences()
            hits += [answer_matches(tokenizer.decode(s), r.answer)
                     for s, r in zip(out, [r for r in chunk for _ in range(mean_at_k)], strict=True)]
        hits = np.asarray(hits, np.float64).reshape(-1, mean_at_k).mean(axis=1)
        if mesh is not None:
            hits, real = mesh_lib.process_concat(hits), mesh_lib.process_concat(real)
        row[f"mean@{mean_at_k}"] = float(hits[real].mean())
    # what paired statistics over problems need (jaxdistill.stats), in the records' order; nan: no answer
    row["per_problem"] = {name: [None if np.isnan(v) else round(float(v), 4) for v in everyone(name)]
                          for name in PER_PROBLEM}
    return row


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per label (e.g. before/after), one column per metric."""
    columns = [c for c, v in next(iter(rows.values())).items() if isinstance(v, float)]
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    return "\n".join(lines)
