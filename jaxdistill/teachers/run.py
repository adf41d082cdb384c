"""`python -m jaxdistill teachers`: every teacher alone vs the aggregation rules, and diversity.

Each arm (a single teacher, or the stack under one rule) answers the held-out problems; its
answers are saved under workdir/arms/ as soon as it finishes, so a rerun skips finished arms.
Diversity is measured by scoring the reference solutions under every teacher at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxdistill import runs, sampling, settings
from jaxdistill.data import qa
from jaxdistill.data.metrics import normalize
from jaxdistill.data.records import answer_matches
from jaxdistill.data.synthetic import SyntheticConfig, synthetic_records
from jaxdistill.errors import ConfigError
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import search as search_lib
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block, validate_teachers

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


def held_out(config):
    """The held-out problems and the few-shot block (built from training problems). `data.task`: "math", the
    synthetic word problems, or "qa", the synthetic questions of four families (multiplication, comparison,
    extraction, sentiment: `data/qa.py`) answered on a '####' line and matched exactly."""
    d = config.data
    if d.get("task", "math") == "qa":
        test = qa.synthetic_questions(d.eval_size, d.seed, "test")
        train = qa.synthetic_questions(d.fewshot_examples, d.seed, "train", exclude={normalize(q.text) for q in test})
        return qa.as_records(test), fewshot_block(qa.as_records(train))
    synthetic = SyntheticConfig(steps=d.steps, max_start=d.max_start, max_operand=d.max_operand)
    test = synthetic_records(d.eval_size, d.seed, synthetic, split="test")
    return test, fewshot_block(synthetic_records(d.fewshot_examples, d.seed, synthetic, split="train"))


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


def search_config(config) -> search_lib.SearchConfig:
    s = config.search
    return search_lib.SearchConfig(right=s.right, wrong=s.wrong, branch_entropy=s.branch_entropy, gap=s.gap,
                                   max_levels=s.max_levels, max_live=s.max_live, min_confidence=s.min_confidence,
                                   token_budget=s.token_budget, max_new_tokens=s.max_new_tokens)


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_logprobs(graphdef, state, tokens, mask):
    logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens, mask=mask)[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0] * mask[:, 1:]


def nll_per_byte(model, tokenizer, texts) -> np.ndarray:
    """Each text's negative log-likelihood per UTF-8 byte (comparable across vocabularies)."""
    ids = [tokenizer.encode(t) for t in texts]
    length = sampling.bucket(max(len(i) for i in ids))
    tokens = np.full((len(ids), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), bool)
    for r, i in enumerate(ids):
        tokens[r, : len(i)], mask[r, : len(i)] = i, True
    graphdef, state = nnx.split(model)
    logp = np.asarray(_token_logprobs(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask)))
    return -logp.sum(axis=1) / np.asarray([max(len(t.encode()), 1) for t in texts])


def run(config) -> dict:
    validate(config)
    return settings.run_in_workdir(config, lambda c, workdir: _run(c, Path(str(workdir))))


def _run(config, workdir: Path) -> dict:
    start = time.perf_counter()
    test, fewshot = held_out(config)
    stack, excluded = load_stack(config, fewshot)
    teachers = stack.teachers

    seeds = config.seeds if config.temperature > 0 else 1
    rule = sampling.rule_from_config(config.temperature)
    batches = [test[i:i + config.batch_size] for i in range(0, len(test), config.batch_size)]
    arms = [f"alone: {t.name}" for t in teachers] + [f"stack: {r}" for r in config.rules]
    bar = tqdm(total=len(arms) * seeds * len(test), desc="teachers: problems", unit="problem")
    (workdir / "arms").mkdir(exist_ok=True)
    results = {}

    def run_arm(arm: str, seed: int, solve) -> dict:
        path = workdir / "arms" / f"{arm.replace(': ', '-')}-seed{seed}.json"
        if path.exists():
            bar.update(len(test))
            return json.loads(path.read_text())
        t0, texts, tokens = time.perf_counter(), [], 0
        for b, batch in enumerate(batches):
            out = solve(b, batch, seed)
            texts += out.texts
            tokens += int(out.mask.sum())
            bar.update(len(batch))
            bar.set_postfix(arm=arm, seed=seed)
        correct = [answer_matches(t, r.answer) for t, r in zip(texts, test, strict=True)]
        row = {"arm": arm, "seed": seed, "accuracy": float(np.mean(correct)), "correct": correct, "texts": texts,
               "tokens": tokens, "seconds": time.perf_counter() - t0}
        runs.atomic_write_text(path, json.dumps(row))
        return row

    run_kw = dict(rule=rule, max_new_tokens=config.max_new_tokens, top_k=config.top_k)
    singles = {}
    for i, t in enumerate(teachers):
        alone = TeacherStack([t], pivot=t.model, width=config.width, loaded=stack.models, fewshot=fewshot)
        singles[i] = [run_arm(arms[i], s, lambda b, batch, s, alone=alone: alone.run(batch, seed=s, **run_kw))
                      for s in range(seeds)]
        results[arms[i]] = singles[i]

    nll = None
    if "perplexity" in config.rules:
        texts = [r.problem for r in test]
        nll = np.stack([nll_per_byte(*stack.models[t.model], texts) for t in teachers], axis=1)  # [P, N]

    def solver(name: str):
        rule_fn = agg_lib.rule_from_config(name if name in agg_lib.RULES else "mean_probs",
                                           threshold=config.gate_threshold)
        offsets = np.cumsum([0] + [len(b) for b in batches])

        def solve(b, batch, seed):
            weights = None
            if name == "perplexity":
                w = agg_lib.perplexity_weights(nll[offsets[b]:offsets[b + 1]], config.perplexity_temperature)
                weights = w * np.asarray([t.weight for t in teachers])
            elif name == "online":  # verified accuracy of each teacher on the earlier batches only
                online = agg_lib.OnlineWeights(len(teachers), config.online_temperature)
                for earlier in range(b):
                    online.update(np.stack([singles[i][seed]["correct"][offsets[earlier]:offsets[earlier + 1]]
                                            for i in range(len(teachers))], axis=1))
                weights = online() * np.asarray([t.weight for t in teachers])
            return stack.run(batch, aggregate=rule_fn, weights=weights, seed=seed, **run_kw)

        return solve

    for name in config.rules:
        arm = f"stack: {name}"
        results[arm] = [run_arm(arm, s, solver(name)) for s in range(seeds)]
    bar.close()

    searched = run_search(config, stack, test[: config.search.problems], workdir, singles, teachers, fewshot)
    diversity = measure_diversity(stack, test, config.batch_size)
    best = max(range(len(teachers)), key=lambda i: np.mean([r["accuracy"] for r in singles[i]]))
    diversity["consensus_differs_from_best"] = diversity["differs"][best]
    plot_diversity(diversity, stack.names, workdir / "diversity.png")

    summary = format_summary(config, config.pivot or teachers[0].model, results, diversity, stack.names, best, excluded,
                             time.perf_counter() - start)
    if searched:
        summary = summary.replace("\nTotal time", format_search(searched) + "\n\nTotal time")
    runs.atomic_write_text(workdir / "summary.md", summary + "\n")
    out = {"arms": {a: {"accuracy": [r["accuracy"] for r in rows], "tokens": [r["tokens"] for r in rows],
                        "seconds": [r["seconds"] for r in rows]} for a, rows in results.items()},
           "teachers": stack.names, "best_single": stack.names[best], "excluded_pivot_tokens": excluded,
           "diversity": {k: np.asarray(v).tolist() for k, v in diversity.items()},
           "search": searched}
    runs.atomic_write_text(workdir / "results.json", json.dumps(out, indent=1))
    print("\n" + summary)
    print(f"\n(written to {workdir}: summary.md, results.json, diversity.png, arms/"
          + (", search/, traces.jsonl, negatives.jsonl, search_tree.png)" if searched else ")"))
    return out


def measure_diversity(stack: TeacherStack, records, batch_size: int) -> dict:
    """Per-position averages over the reference solutions scored under every teacher's prompt."""
    totals = None
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        forced = [stack.pivot.encode(r.solution, add_special_tokens=False) for r in batch]
        stats = stack.score(batch, forced, top_k=0, diversity=True).stats
        totals = stats if totals is None else {k: totals[k] + stats[k] for k in stats}
    n = float(totals["positions"])
    return {"positions": n, "js": totals["js"] / n, "agree": totals["agree"] / n,
            "entropy_gain": float(totals["entropy_gain"]) / n, "differs": totals["differs"] / n}


def plot_diversity(diversity: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(names), 3 + 0.4 * len(names)))
    for ax, key, title, cmap in ((axes[0], "js", "Jensen-Shannon divergence (nats)", "magma_r"),
                                 (axes[1], "agree", "top-1 agreement", "viridis")):
        m = np.asarray(diversity[key])
        image = ax.imshow(m, cmap=cmap, vmin=0, vmax=np.log(2) if key == "js" else 1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white" if (v > 0.5) == (key == "js") else
                    "black", fontsize=8)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"Teacher diversity on reference solutions ({int(diversity['positions'])} positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(config, pivot, results, diversity, names, best, excluded, seconds) -> str:
    lines = [f"# Teacher stack on {config.data.eval_size} held-out synthetic problems", "",
             f"teachers: {', '.join(names)}; pivot vocabulary of {pivot}; "
             f"top-{config.top_k} candidates; width {config.width} (pivot tokens excluded per teacher: {excluded}); "
             f"{'greedy' if config.temperature == 0 else f'temperature {config.temperature}'}; "
             f"{len(next(iter(results.values())))} seed(s)", "",
             "| arm | accuracy | tokens generated | seconds |", "|---|---|---|---|"]
    for arm, rows in results.items():
        acc = [r["accuracy"] for r in rows]
        spread = f" ± {np.std(acc):.3f}" if len(acc) > 1 else ""
        lines.append(f"| {arm} | {np.mean(acc):.3f}{spread} | {np.mean([r['tokens'] for r in rows]):.0f} | "
                     f"{np.mean([r['seconds'] for r in rows]):.0f} |")
    best_acc = np.mean([r["accuracy"] for r in results[f"alone: {names[best]}"]])
    stack_best = max((a for a in results if a.startswith("stack")), default=None,
                     key=lambda a: np.mean([r["accuracy"] for r in results[a]]))
    if stack_best:
        gap = np.mean([r["accuracy"] for r in results[stack_best]]) - best_acc
        lines += ["", f"Best single teacher: {names[best]} ({best_acc:.3f}). Best rule: {stack_best} "
                      f"({gap:+.3f} against it)."]
    js = np.asarray(diversity["js"])
    agree = np.asarray(diversity["agree"])
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    lines += ["", f"Diversity on the reference solutions ({int(diversity['positions'])} positions):", ""]
    lines += [f"- {names[i]} vs {names[j]}: JS {js[i, j]:.3f} nats, top-1 agreement {agree[i, j]:.2f}"
              for i, j in pairs]
    lines += [f"- mixture entropy minus mean member entropy: {diversity['entropy_gain']:.3f} nats",
              f"- positions where the mixture's top token differs from the best single teacher's: "
              f"{diversity['consensus_differs_from_best']:.2f}", "", f"Total time {seconds:.0f}s."]
    return "\n".join(lines)


def run_search(config, stack, problems, workdir: Path, singles, teachers, fewshot) -> dict | None:
    """Branch search per problem (saved as it finishes), then best-of-N sampling from the best single
    teacher with the same number of generated tokens, over `seeds` seeds."""
    if not problems:
        return None
    sc = search_config(config)
    rule = agg_lib.rule_from_config(config.search.rule, threshold=config.gate_threshold)
    (workdir / "search").mkdir(exist_ok=True)
    found = []
    for record in tqdm(problems, desc="branch search: problems", unit="problem"):
        found.append(search_saved(stack, record, sc, rule, config.top_k, workdir / "search" / f"{record.uid}.json"))

    best = max(range(len(teachers)), key=lambda i: np.mean([r["accuracy"] for r in singles[i]]))
    alone = TeacherStack([teachers[best]], pivot=teachers[best].model, loaded=stack.models, fewshot=fewshot)
    baseline = [best_of_n(lambda: alone, problems, [r["tokens"] for r in found], seed,
                          config.search.baseline_temperature, sc.max_new_tokens,
                          workdir / "search" / f"best-of-n-seed{seed}.json")
                for seed in range(config.seeds)]  # per seed: gold traces and tokens per problem

    write_traces(problems, found, stack, workdir, rule, config.top_k, config.search.get("trace_top", 0))
    plot_tree(found[0], problems[0], workdir / "search_tree.png")
    search_tokens = sum(r["tokens"] for r in found)
    search_gold = sum(sum(leaf["correct"] for leaf in r["leaves"]) for r in found)
    return {
        "problems": len(problems), "rule": config.search.rule, "teacher_for_best_of_n": teachers[best].name,
        "search": {"tokens": search_tokens, "gold": search_gold, "gold_per_1k": 1000 * search_gold / search_tokens,
                   "solved": sum(any(leaf["correct"] for leaf in r["leaves"]) for r in found),
                   "leaves": sum(len(r["leaves"]) for r in found), "pruned": sum(r["pruned"] for r in found),
                   "seconds": sum(r["seconds"] for r in found)},
        "best_of_n": [{"tokens": sum(r["tokens"] for r in rows), "gold": sum(r["gold"] for r in rows),
                       "gold_per_1k": 1000 * sum(r["gold"] for r in rows) / max(sum(r["tokens"] for r in rows), 1),
                       "solved": sum(r["gold"] > 0 for r in rows), "draws": sum(r["draws"] for r in rows)}
                      for rows in baseline],
    }


def best_of_n(teacher, problems, budgets: list[int], seed: int, temperature: float, max_new_tokens: int,
              path: Path) -> list[dict]:
    """Independent samples (4 per call) from one teacher until each problem has used its token budget;
    per problem the gold traces (count and texts), tokens and draws. Saved to `path`; read back if it holds
    these problems. `teacher()` returns the one-teacher stack; it is called only when sampling is needed,
    so a rerun with every file saved loads no model."""
    if not path.exists() or [r["uid"] for r in json.loads(path.read_text())] != [r.uid for r in problems]:
        alone = teacher()
        sample, rows = sampling.Sample(temperature=temperature), []
        for record, budget in zip(problems, budgets, strict=True):
            gold, tokens, draws, k = [], 0, 0, 0
            while tokens < budget:
                out = alone.run([record] * 4, rule=sample, max_new_tokens=max_new_tokens, seed=seed * 1000 + k)
                k += 1
                for text, mask in zip(out.texts, out.mask, strict=True):
                    if tokens >= budget:
                        break
                    tokens += int(mask.sum())
                    draws += 1
                    if answer_matches(text, record.answer):
                        gold.append(text)
            rows.append({"uid": record.uid, "gold": len(gold), "gold_texts": gold, "tokens": tokens, "draws": draws})
        runs.atomic_write_text(path, json.dumps(rows))
    return json.loads(path.read_text())


def search_saved(stack, record, sc: search_lib.SearchConfig, rule, top_k: int, path: Path) -> dict:
    """One problem's branch search as saved JSON (leaves and branches); read back if already saved."""
    if not path.exists():
        t0 = time.perf_counter()
        result = search_lib.search(stack, record, sc, aggregate=rule, top_k=top_k)
        runs.atomic_write_text(path, json.dumps({
            "uid": record.uid, "tokens": result.tokens, "pruned": result.pruned,
            "seconds": time.perf_counter() - t0, "leaves": result.leaves,
            "branches": [dataclasses.asdict(b) for b in result.branches]}))
    return json.loads(path.read_text())


def write_traces(problems, found, stack, workdir: Path, rule=None, top_k: int = 10, trace_top: int = 0) -> None:
    """traces.jsonl: gold traces in the generic record form the self-distillation loader reads
    (prompt, solution, answer); negatives.jsonl: preference pairs with the located mistake.

    With trace_top > 0, each gold trace also carries the stack's aggregated distribution at each
    of its tokens (the top `trace_top` pivot ids and log-probs, scored by forcing the trace):
    a sparse multi-teacher target."""
    gold_lines, negative_lines = [], []
    for record, result in zip(problems, found, strict=True):
        by_branch = {leaf["branch"]: leaf for leaf in result["leaves"]}
        gold = [leaf for leaf in result["leaves"] if leaf["correct"]]
        scored = (stack.score([record] * len(gold), [g["tokens"] for g in gold], aggregate=rule, top_k=top_k,
                              record_top=trace_top) if gold and trace_top else None)
        for leaf in result["leaves"]:
            meta = {"uid": record.uid, "branch": leaf["branch"], "path": leaf["path"],
                    "confidence": leaf["confidence"]}
            if leaf["correct"]:
                line = {"prompt": record.problem, "solution": leaf["text"], "answer": record.answer, "kind": "gold",
                        **meta}
                if scored is not None:
                    row, n = gold.index(leaf), len(leaf["tokens"])
                    line |= {"pivot_tokens": leaf["tokens"], "top_ids": scored.top_ids[row, :n].tolist(),
                             "top_logprobs": np.round(scored.top_logprobs[row, :n], 4).tolist()}
                gold_lines.append(line)
            elif "wrong_at" in leaf:
                negative_lines.append({
                    "prompt": record.problem, "chosen": by_branch[leaf["gold_branch"]]["text"],
                    "rejected": leaf["text"], "answer": record.answer, "kind": "negative",
                    "wrong_at_token": leaf["wrong_at"], "wrong_token": leaf["wrong_token"],
                    "gold_token": leaf["gold_token"], "proposals": leaf.get("proposals"), **meta})
    for name, lines in (("traces.jsonl", gold_lines), ("negatives.jsonl", negative_lines)):
        runs.atomic_write_text(workdir / name, "".join(json.dumps(line) + "\n" for line in lines))


def plot_tree(result: dict, record, path: Path) -> None:
    """One problem's search tree: branches by the token where they left their parent, coloured by
    direction, leaves by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    branches = result["branches"]
    ends = {leaf["branch"]: leaf for leaf in result["leaves"]}
    lane = {}
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(branches) + 1.5))
    for b in branches:
        lane[b["id"]] = len(lane)
        y = lane[b["id"]]
        end = len(ends[b["id"]]["tokens"]) if b["id"] in ends else b["position"] + 1
        colour = {"root": "black", "right": "tab:blue", "wrong": "tab:red"}[b["kind"]]
        if b["parent"] >= 0:
            ax.plot([b["position"], b["position"]], [lane[b["parent"]], y], color="lightgray", lw=0.8, zorder=1)
        ax.plot([b["position"], end], [y, y], color=colour, lw=2, zorder=2)
        if b["id"] in ends:
            ax.scatter([end], [y], color="tab:green" if ends[b["id"]]["correct"] else "gray", s=30, zorder=3)
    ax.invert_yaxis()
    ax.set_yticks([])
    ax.set_xlabel("token position")
    ax.set_title(f"search tree for {record.uid}: blue right direction, red wrong direction; "
                 "green leaf verified, gray wrong", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_search(searched: dict) -> str:
    s, runs_ = searched["search"], searched["best_of_n"]
    per_1k = [r["gold_per_1k"] for r in runs_]
    solved = [r["solved"] for r in runs_]
    return "\n".join([
        "", f"Branch search ({searched['rule']}) on {searched['problems']} problems vs best-of-N sampling from "
        f"{searched['teacher_for_best_of_n']} at the same generated tokens ({len(runs_)} seeds):", "",
        "| method | generated tokens | gold traces | gold per 1k tokens | problems with a gold trace |",
        "|---|---:|---:|---:|---:|",
        f"| branch search | {s['tokens']} | {s['gold']} | {s['gold_per_1k']:.2f} | {s['solved']} |",
        f"| best-of-N | {np.mean([r['tokens'] for r in runs_]):.0f} | {np.mean([r['gold'] for r in runs_]):.1f} | "
        f"{np.mean(per_1k):.2f} ± {np.std(per_1k):.2f} | {np.mean(solved):.1f} |",
        "", f"Search: {s['leaves']} leaves, {s['pruned']} branches pruned, {s['seconds']:.0f}s."])
