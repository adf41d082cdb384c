"""`python -m jaxdistill teachers`: every teacher alone vs the aggregation rules, and diversity.

Each arm (a single teacher, or the stack under one rule) answers the held-out problems; its
answers are saved under workdir/arms/ as soon as it finishes, so a rerun skips finished arms.
Diversity is measured by scoring the reference solutions under every teacher at once.

No held-out answer reaches a decision: the online rule's weights and the teacher that
best-of-N samples from are chosen by each teacher's verified accuracy on `online_problems`
training problems (after the few-shot examples in the training split), never on held-out ones.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from jaxdistill import runs, sampling, settings
from jaxdistill.data import qa
from jaxdistill.data.metrics import normalize
from jaxdistill.data.records import answer_matches
from jaxdistill.data.synthetic import TEST_WINDOW, SyntheticConfig, synthetic_records
from jaxdistill.errors import ConfigError
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers.evaluate import (
    comparison_table,
    format_summary,
    measure_diversity,
    nll_per_byte,
    oracle_correct,
    plot_diversity,
)
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block, validate_teachers
from jaxdistill.teachers.traces import format_search, run_search, search_config

RULES = ("mean_probs", "mean_logprobs", "gated", "perplexity", "online")


def validate(config) -> None:
    """Every setting, before any model loads."""
    teachers = [TeacherConfig.from_config(t) for t in config.teachers]
    validate_teachers(teachers)
    models = {t.model for t in teachers}
    if config.pivot and config.pivot not in models:
        raise ConfigError(f"pivot {config.pivot!r} is not a teacher's model; use one of {sorted(models)} or ''.")
    unknown = [r for r in config.rules if r not in RULES]
    if unknown:
        raise ConfigError(f"unknown aggregation rules {unknown}; known: {list(RULES)}.")
    checks = [
        (config.width >= 1, f"width must be >= 1, got {config.width}."),
        (config.top_k >= 0, f"top_k must be >= 0 (0: every token), got {config.top_k}."),
        (config.temperature >= 0, f"temperature must be >= 0 (0: greedy), got {config.temperature}."),
        (config.seeds >= 1, f"seeds must be >= 1, got {config.seeds}."),
        (config.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {config.max_new_tokens}."),
        (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}."),
        (config.data.eval_size >= 1, f"data.eval_size must be >= 1, got {config.data.eval_size}."),
        (config.data.fewshot_examples >= 0, "data.fewshot_examples must be >= 0."),
        (0 < config.gate_threshold <= 1, f"gate_threshold must be in (0, 1], got {config.gate_threshold}."),
        (config.perplexity_temperature > 0, "perplexity_temperature must be > 0."),
        (config.online_temperature > 0, "online_temperature must be > 0."),
        (config.online_problems >= 1, f"online_problems must be >= 1, got {config.online_problems}."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    SyntheticConfig(steps=config.data.steps, max_start=config.data.max_start, max_operand=config.data.max_operand)
    if config.data.get("task", "math") not in ("math", "qa"):
        raise ConfigError(f"data.task must be 'math' or 'qa', got {config.data.task!r}.")
    search_config(config)
    if config.search.rule not in agg_lib.RULES:
        raise ConfigError(f"search.rule must be one of {sorted(agg_lib.RULES)}, got {config.search.rule!r}.")
    if config.search.problems < 0 or config.search.baseline_temperature <= 0:
        raise ConfigError("search.problems must be >= 0 and search.baseline_temperature > 0.")


class Problems(NamedTuple):
    test: list  # held-out: every arm is scored on these
    fit: list  # training problems that choose the online weights and the best-of-N teacher
    search: list  # training problems the branch search writes traces for
    fewshot: str  # the few-shot block, from the first training problems


def problems(config, search: int = 0) -> Problems:
    """The problems of a teachers or prune run. The training split holds, in order, the few-shot
    examples, `online_problems` for fitting and `search` for the branch search; none is held out
    (a search problem that is also a held-out one is refused).
    `data.task`: "math", the synthetic word problems, or "qa", the synthetic questions of four
    families (multiplication, comparison, extraction, sentiment: `data/qa.py`) answered on a '####'
    line and matched exactly."""
    d = config.data
    shots, fit = d.fewshot_examples, config.get("online_problems", 16)
    train_count = shots + fit + search
    if d.get("task", "math") == "qa":
        test = qa.synthetic_questions(d.eval_size, d.seed, "test")
        train = qa.synthetic_questions(train_count, d.seed, "train", exclude={normalize(q.text) for q in test})
        test, train = qa.as_records(test), qa.as_records(train)
    else:
        synthetic = SyntheticConfig(steps=d.steps, max_start=d.max_start, max_operand=d.max_operand)
        test = synthetic_records(d.eval_size, d.seed, synthetic, split="test")
        train = synthetic_records(train_count, d.seed, synthetic, split="train", held_out=max(len(test), TEST_WINDOW))
    searched = train[shots + fit:]
    overlap = {normalize(r.problem) for r in searched} & {normalize(r.problem) for r in test}
    if overlap:  # traces are training data: never from a problem the evaluation holds out
        raise ConfigError(f"{len(overlap)} search problems are also held-out problems (first: "
                          f"{sorted(overlap)[0][:60]!r}); search only training problems.")
    return Problems(test=test, fit=train[shots:shots + fit], search=searched, fewshot=fewshot_block(train[:shots]))


def load_stack(config, fewshot: str) -> tuple[TeacherStack, dict]:
    """The stack, and per group the pivot tokens it cannot take (needing more than `width` tokens)."""
    teachers = [TeacherConfig.from_config(t) for t in config.teachers]
    stack = TeacherStack(teachers, pivot=config.pivot or None, width=config.width, dtype=config.dtype,
                         fewshot=fewshot, fewshot_ends_turn=config.get("fewshot_ends_turn", False))
    excluded = {stack.teachers[g.teachers[0]].name: g.alignment.excluded for g in stack.groups}
    print(f"teacher stack: {len(teachers)} teachers in {len(stack.groups)} groups "
          f"{[[stack.names[i] for i in g.teachers] for g in stack.groups]}; pivot vocabulary "
          f"{stack.pivot.vocab_size}, {int(stack.allowed.sum())} candidate tokens (pivot tokens needing more than "
          f"{config.width} tokens in: {excluded})")
    return stack, excluded


def run(config) -> dict:
    validate(config)
    return settings.run_in_workdir(config, lambda c, workdir: _run(c, Path(str(workdir))))


def _run(config, workdir: Path) -> dict:
    start = time.perf_counter()
    commit = runs.source_commit()  # the code this run loads, before anything can change it
    test, train, search_problems, fewshot = problems(config, search=config.search.problems)
    # Models load on first use: a rerun whose arms, search and diversity are all saved loads none.
    loaded_stack = functools.cache(lambda: load_stack(config, fewshot))
    teachers = [TeacherConfig.from_config(t) for t in config.teachers]
    names = [t.name for t in teachers]

    seeds = config.seeds if config.temperature > 0 else 1
    rule = sampling.rule_from_config(config.temperature)
    arms = [f"alone: {name}" for name in names] + [f"stack: {r}" for r in config.rules]
    bar = tqdm(total=len(teachers) * seeds * len(train) + len(arms) * seeds * len(test), desc="teachers: problems",
               unit="problem")
    (workdir / "arms").mkdir(exist_ok=True)
    results = {}

    def run_arm(arm: str, seed: int, solve, records=test) -> dict:
        def compute():
            t0, texts, tokens = time.perf_counter(), [], 0
            for b, first in enumerate(range(0, len(records), config.batch_size)):
                out = solve(b, records[first:first + config.batch_size], seed)
                texts += out.texts
                tokens += int(out.mask.sum())
                bar.update(len(out.texts))
                bar.set_postfix(arm=arm, seed=seed)
            correct = [answer_matches(t, r.answer) for t, r in zip(texts, records, strict=True)]
            return {"arm": arm, "seed": seed, "accuracy": float(np.mean(correct)), "correct": correct,
                    "texts": texts, "tokens": tokens, "seconds": time.perf_counter() - t0}

        path = workdir / "arms" / f"{arm.replace(': ', '-')}-seed{seed}.json"
        if path.exists():
            bar.update(len(records))
        return runs.json_once(path, compute)

    run_kw = dict(rule=rule, max_new_tokens=config.max_new_tokens, top_k=config.top_k)

    def alone(t: TeacherConfig) -> TeacherStack:
        return TeacherStack([t], pivot=t.model, width=config.width, loaded=loaded_stack()[0].models, fewshot=fewshot)

    singles, fitted = {}, {}  # per teacher: its held-out rows; its training rows (for choices), per seed
    for i, t in enumerate(teachers):
        solo = functools.cache(lambda t=t: alone(t))
        solve = lambda b, batch, s, solo=solo: solo().run(batch, seed=s, **run_kw)  # noqa: E731
        fitted[i] = [run_arm(f"train: {t.name}", s, solve, records=train) for s in range(seeds)]
        singles[i] = [run_arm(arms[i], s, solve) for s in range(seeds)]
        results[arms[i]] = singles[i]
    train_accuracy = np.asarray([[row["accuracy"] for row in fitted[i]] for i in range(len(teachers))])  # [N, S]

    @functools.cache
    def nll() -> np.ndarray:  # [P, N]: each teacher's per-byte NLL of each held-out problem
        stack = loaded_stack()[0]
        return np.stack([nll_per_byte(*stack.models[t.model], [r.problem for r in test]) for t in teachers], axis=1)

    def solver(name: str):
        rule_fn = agg_lib.rule_from_config(name if name in agg_lib.RULES else "mean_probs",
                                           threshold=config.gate_threshold)
        offsets = [*range(0, len(test), config.batch_size), len(test)]  # batch b is test[offsets[b]:offsets[b + 1]]

        def solve(b, batch, seed):
            weights = None
            if name == "perplexity":
                w = agg_lib.perplexity_weights(nll()[offsets[b]:offsets[b + 1]], config.perplexity_temperature)
                weights = w * np.asarray([t.weight for t in teachers])
            elif name == "online":  # each teacher's verified accuracy on the training problems
                online = agg_lib.OnlineWeights(len(teachers), config.online_temperature)
                online.update(np.stack([fitted[i][seed]["correct"] for i in range(len(teachers))], axis=1))
                weights = online() * np.asarray([t.weight for t in teachers])
            return loaded_stack()[0].run(batch, aggregate=rule_fn, weights=weights, seed=seed, **run_kw)

        return solve

    for name in config.rules:
        arm = f"stack: {name}"
        results[arm] = [run_arm(arm, s, solver(name)) for s in range(seeds)]
    bar.close()

    best = int(np.argmax(train_accuracy.mean(axis=1)))  # chosen on training problems
    searched = run_search(config, lambda: loaded_stack()[0], search_problems, workdir, teachers[best], fewshot)

    def stack_measures() -> dict:
        stack, excluded = loaded_stack()
        diversity = measure_diversity(stack, test, config.batch_size)
        return {"excluded": excluded, **{k: np.asarray(v).tolist() for k, v in diversity.items()}}

    diversity = runs.json_once(workdir / "arms" / "diversity.json", stack_measures)
    excluded = diversity.pop("excluded")
    diversity = {k: np.asarray(v) if isinstance(v, list) else v for k, v in diversity.items()}
    diversity["consensus_differs_from_best"] = diversity["differs"][best]
    plot_diversity(diversity, names, workdir / "diversity.png")

    oracle = oracle_correct(results, names)
    out = {"arms": {a: {"accuracy": [r["accuracy"] for r in rows], "tokens": [r["tokens"] for r in rows],
                        "seconds": [r["seconds"] for r in rows], "correct": [r["correct"] for r in rows]}
                    for a, rows in results.items()},
           "oracle": {"accuracy": [float(np.mean(c)) for c in oracle], "correct": oracle},
           "teachers": names, "best_single": names[best], "excluded_pivot_tokens": excluded,
           "train_accuracy": {names[i]: train_accuracy[i].tolist() for i in range(len(teachers))},
           "diversity": {k: np.asarray(v).tolist() for k, v in diversity.items()},
           "search": searched, "commit": commit}
    summary = format_summary(config, config.pivot or teachers[0].model, results, diversity, names, best, excluded,
                             time.perf_counter() - start)
    summary = summary.replace("\nTotal time", "\n" + comparison_table(out) + "\n\nTotal time")
    if searched:
        summary = summary.replace("\nTotal time", format_search(searched) + "\n\nTotal time")
    runs.atomic_write_text(workdir / "summary.md", summary + "\n")
    runs.atomic_write_text(workdir / "results.json", json.dumps(out, indent=1))
    with runs.board(config, workdir) as board:  # one point per arm: the mean over seeds
        board.scalars({f"{arm}/{field}": np.mean(values) for arm, row in out["arms"].items()
                       for field, values in row.items()}, step=0)
        board.publish(step=0)
    print("\n" + summary)
    print(f"\n(written to {workdir}: summary.md, results.json, diversity.png, tensorboard/, arms/"
          + (", search/, traces.jsonl, negatives.jsonl, search_tree.png)" if searched else ")"))
    return out


