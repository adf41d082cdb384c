"""Learned pruning for the branch search: a PPO policy that expands, continues or prunes a branch.

Training a pruner inside the live search would decode every rollout again for every PPO
update. Instead the search runs once per problem with no pruning (every pause below
`max_levels` expands, no budget), and its complete tree is kept: per branch its parent and
children, its tokens, what the stack looked like where it paused (`search.pause_features`)
and whether it ended in a verified answer. Decoding is greedy, so the search any pruning
policy would run on that problem is a subtree of the recorded one, and it is replayed
exactly from the arrays, in JAX. At each live branch's pause, in the order the search made
them, the policy chooses

    expand    every recorded child decodes on: right and wrong directions;
    continue  only the consensus child (child 0, the stack's top token) decodes on;
    prune     the branch stops here.

At a pause on the last level there are no children: expand and continue both let the
branch finish. A decision earns the gold traces it leads to minus `alpha` per 1,000
generated tokens, so episode return = gold traces - alpha * tokens / 1000. The heuristic it
is compared with is the live search's own pruner (prune below a mean top probability,
else expand), swept over thresholds, at equal tokens on held-out problems.

    python -m jaxdistill prune --config=experiments/teachers/pruning.py
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdistill import runs, settings, stats
from jaxdistill.errors import ConfigError
from jaxdistill.rl import ppo
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import pruning_env, traces
from jaxdistill.teachers import run as teachers_run
from jaxdistill.teachers import search as search_lib
from jaxdistill.teachers.pruning_env import (
    CONTINUE,
    EXPAND,
    FEATURES,
    Price,
    confidence_pruner,
    constant,
    leaves_reached,
    replay,
    trees_from_searches,
)
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack


def complete_search_config(config) -> search_lib.SearchConfig:
    """The recording search: the configured expansion, with pruning and the budget off."""
    sc = traces.search_config(config)
    leaves = (sc.right + sc.wrong) ** sc.max_levels
    return search_lib.SearchConfig(right=sc.right, wrong=sc.wrong, branch_entropy=sc.branch_entropy, gap=sc.gap,
                                   max_levels=sc.max_levels, max_live=max(leaves, sc.right + sc.wrong),
                                   min_confidence=0.0, token_budget=leaves * sc.max_new_tokens,
                                   max_new_tokens=sc.max_new_tokens)


def validate(config) -> None:
    teachers_run.validate(config)
    c = config.pruning
    checks = [
        (1 <= c.train_problems < c.problems <= config.data.eval_size,
         f"pruning needs 1 <= train_problems < problems <= data.eval_size, got {c.train_problems}, "
         f"{c.problems}, {config.data.eval_size}."),
        (len(c.alphas) >= 1 and all(a >= 0 for a in c.alphas), f"pruning.alphas must be >= 0, got {c.alphas}."),
        (c.seeds >= 1, f"pruning.seeds must be >= 1, got {c.seeds}."),
        (config.search.max_levels >= 1, "the recorded search needs search.max_levels >= 1 to have choices."),
        (c.best_of_n_teacher in [t["name"] for t in config.teachers],
         f"pruning.best_of_n_teacher {c.best_of_n_teacher!r} is not a teacher; use one of "
         f"{[t['name'] for t in config.teachers]}."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    ppo.PPOConfig.from_config(c.ppo)


def run(config) -> dict:
    validate(config)
    return settings.run_in_workdir(config, lambda c, workdir: _run(c, Path(str(workdir))))


def record(config, workdir: Path) -> tuple[list, list[dict]]:
    """The complete search tree of each problem (training problems: never the held-out ones the
    teachers are evaluated on), saved as it finishes (a rerun reads them back)."""
    _, _, problems, fewshot = teachers_run.problems(config, search=config.pruning.problems)
    trees_dir = workdir / "trees"
    trees_dir.mkdir(exist_ok=True)
    if all((trees_dir / f"{r.uid}.json").exists() for r in problems):
        return problems, [json.loads((trees_dir / f"{r.uid}.json").read_text()) for r in problems]
    stack, _ = teachers_run.load_stack(config, fewshot)
    rule = agg_lib.rule_from_config(config.search.rule, threshold=config.gate_threshold)
    sc = complete_search_config(config)
    found = [traces.search_saved(lambda: stack, r, sc, rule, config.top_k, trees_dir / f"{r.uid}.json")
             for r in tqdm(problems, desc="recording complete search trees", unit="problem")]
    return problems, found


def best_of_n_baseline(config, workdir: Path, problems, held_out: list[dict]) -> dict:
    """Sampling from one teacher (`pruning.best_of_n_teacher`) on the held-out problems, each with the tokens
    of its complete tree, over `pruning.seeds` seeds: gold traces and tokens per seed."""
    c = config.pruning
    by_uid = {r.uid: r for r in problems}
    teacher = next(t for t in config.teachers if t["name"] == c.best_of_n_teacher)

    @functools.cache
    def alone() -> TeacherStack:
        one = TeacherConfig.from_config(teacher)
        return TeacherStack([one], pivot=one.model, fewshot=teachers_run.problems(config).fewshot)

    rows = [traces.best_of_n(alone, [by_uid[f["uid"]] for f in held_out], [f["tokens"] for f in held_out], s,
                                   config.search.baseline_temperature, config.search.max_new_tokens,
                                   workdir / "trees" / f"best-of-n-{teacher['name']}-seed{s}.json")
            for s in range(c.seeds)]
    per_seed = [{"gold": sum(r["gold"] for r in seed_rows), "tokens": sum(r["tokens"] for r in seed_rows),
                 "solved": sum(r["gold"] > 0 for r in seed_rows)} for seed_rows in rows]
    return {"teacher": teacher["name"], "temperature": config.search.baseline_temperature, "seeds": per_seed,
            "rows": rows}


def matched_comparison(test, searches: list[dict], tuned: list[dict], rows: list[list[dict]]) -> list[dict]:
    """Per price: the confidence pruner at its threshold chosen on the training trees, replayed on
    the held-out trees, against best-of-N given exactly the search's tokens on each problem, plain
    and with the same confidence pruner on its samples (`traces.matched_best_of_n`). Problems
    solved (a gold trace found) are compared problem by problem, paired over best-of-N's seeds."""
    out = []
    for h in tuned:
        replayed = replay(test, confidence_pruner(h["threshold"]))
        gold, tokens = np.asarray(replayed["gold"]), np.asarray(replayed["tokens"]).astype(int)
        reached = leaves_reached(test, replayed)
        distinct = sum(len({traces.same_text(leaf["text"]) for leaf in found["leaves"]
                            if leaf["correct"] and reached[p, leaf["branch"]]}) for p, found in enumerate(searches))
        row = {"alpha": h["alpha"], "threshold": h["threshold"], "tokens": int(tokens.sum()), "problems": len(gold),
               "search": {"gold": int(gold.sum()), "distinct": distinct, "solved": int((gold > 0).sum()),
                          "solved_per_problem": (gold > 0).astype(int).tolist()}}
        solved = np.broadcast_to(gold > 0, (len(rows), len(gold))).astype(float)
        for name, threshold in (("best_of_n", 0.0), ("best_of_n_filtered", h["threshold"])):
            matched = [[traces.matched_best_of_n(r, int(t), threshold) for r, t in zip(seed_rows, tokens, strict=True)]
                       for seed_rows in rows]
            theirs = np.asarray([[m["gold"] > 0 for m in seed] for seed in matched], float)
            row[name] = {"gold": [sum(m["gold"] for m in seed) for seed in matched],
                         "distinct": [sum(m["distinct"] for m in seed) for seed in matched],
                         "solved": theirs.sum(axis=1).astype(int).tolist(),
                         "solved_per_problem": theirs.astype(int).tolist(),  # [seeds, problems]
                         "tokens": [sum(m["tokens"] for m in seed) for seed in matched],
                         "search_minus_solved": stats.bootstrap(solved, minus=theirs)}
        out.append(row)
    return out


def _run(config, workdir: Path) -> dict:
    begin = time.perf_counter()
    commit = runs.source_commit()  # the code this run loads, before anything can change it
    c = config.pruning
    problems, found = record(config, workdir)
    sc = complete_search_config(config)
    parts = found[: c.train_problems], found[c.train_problems:]
    unpaused = [[f["uid"] for f in part if f["branches"][0]["features"] is None] for part in parts]
    if any(unpaused):
        print(f"left out, the search never paused (nothing to decide): {unpaused[0]} (training), "
              f"{unpaused[1]} (held out)", flush=True)
    parts = [[f for f in part if f["branches"][0]["features"] is not None] for part in parts]
    if not all(parts):
        raise ConfigError("no training or no held-out search paused, so there is nothing to decide: lower "
                          "search.branch_entropy or raise pruning.problems.")
    train, test = (trees_from_searches(part, sc) for part in parts)
    baseline = best_of_n_baseline(config, workdir, problems, parts[1])

    ppo_config = ppo.PPOConfig.from_config(c.ppo)
    train_fn = ppo.make_train(ppo_config, train, Price(), dynamics=pruning_env)
    alphas = np.asarray(c.alphas, np.float32)
    keys = jax.random.split(jax.random.key(c.seed), c.seeds)
    t0 = time.perf_counter()
    states, history = jax.block_until_ready(ppo.train_grid(train_fn, train, keys, jnp.asarray(alphas)))
    params = states.params
    ppo_seconds = time.perf_counter() - t0
    print(f"ppo: {len(alphas)} prices x {c.seeds} seeds in {ppo_seconds:.1f}s", flush=True)
    graphdef = ppo.policy_graph(train, ppo_config)

    def greedy(p):
        return lambda obs: jnp.argmax(ppo.apply(graphdef, p, obs)[0], axis=-1)

    def scored(trees, policy) -> dict:
        out = replay(trees, policy)
        return {"gold": float(out["gold"].sum()), "tokens": float(out["tokens"].sum()),
                "solved": int((out["gold"] > 0).sum())}

    learned = [{"alpha": float(a), "seed": s, **scored(test, greedy(ppo.select(params, ai, s))),
                "train": scored(train, greedy(ppo.select(params, ai, s)))}
               for ai, a in enumerate(alphas) for s in range(c.seeds)]
    heuristic = [{"threshold": float(t), **scored(test, confidence_pruner(t))} for t in c.thresholds]
    # the heuristic's threshold chosen like the policy's weights: on the training trees, per price
    on_train = [(t, scored(train, confidence_pruner(t))) for t in c.thresholds]
    tuned = []
    for alpha in alphas:
        t, _ = max(on_train, key=lambda x, a=float(alpha): x[1]["gold"] - a * x[1]["tokens"] / 1000)
        tuned.append({"alpha": float(alpha), "threshold": float(t), **scored(test, confidence_pruner(t))})
    fixed = {name: scored(test, constant(a)) for name, a in (("expand everything", EXPAND),
                                                             ("consensus only (greedy)", CONTINUE))}
    result = {"problems": len(problems), "train_problems": train.n_problems, "test_problems": test.n_problems,
              "test_uids": [f["uid"] for f in parts[1]],
              "never_paused": unpaused,
              "learned": learned, "heuristic": heuristic, "fixed": fixed, "ppo_seconds": ppo_seconds,
              "record_seconds": sum(f["seconds"] for f in found), "features": list(FEATURES),
              "history": {k: np.asarray(v).tolist() for k, v in history.items() if k.startswith("episode_")}}
    result["best_of_n"] = baseline
    result["equal_tokens"] = equal_token_comparison(learned, heuristic, c.seeds)
    result["tuned_heuristic"] = tuned
    result["matched_best_of_n"] = matched_comparison(test, parts[1], tuned, result["best_of_n"].pop("rows"))
    result["commit"] = commit
    plot(result, workdir / "pruning.png")
    summary = format_summary(result, config, time.perf_counter() - begin)
    runs.atomic_write_text(workdir / "results.json", json.dumps(result, indent=1))
    runs.atomic_write_text(workdir / "summary.md", summary)
    with runs.board(config, workdir) as board:
        board.curves(result["history"], alphas)
        board.publish(step=ppo_config.num_updates)
    print(summary)
    return result


def heuristic_gold_at(heuristic: list[dict], tokens: float) -> float:
    """The heuristic frontier's gold at `tokens`: best gold at or below, linearly between frontier points."""
    points = sorted((h["tokens"], h["gold"]) for h in heuristic)
    frontier = []
    for t, g in points:
        if not frontier or g > frontier[-1][1]:
            frontier.append((t, g))
    xs, ys = zip(*frontier, strict=True)
    return float(np.interp(tokens, xs, ys, left=0.0))


def equal_token_comparison(learned: list[dict], heuristic: list[dict], seeds: int) -> list[dict]:
    """Per price: the learned policies' mean gold and tokens over seeds, against the heuristic at their tokens."""
    rows = []
    for alpha in sorted({r["alpha"] for r in learned}):
        runs_ = [r for r in learned if r["alpha"] == alpha]
        gains = [r["gold"] - heuristic_gold_at(heuristic, r["tokens"]) for r in runs_]
        rows.append({"alpha": alpha, "tokens": float(np.mean([r["tokens"] for r in runs_])),
                     "gold": float(np.mean([r["gold"] for r in runs_])),
                     "gold_std": stats.mean_sd([r["gold"] for r in runs_])[1],
                     "heuristic_gold": float(np.mean([heuristic_gold_at(heuristic, r["tokens"]) for r in runs_])),
                     "gain": float(np.mean(gains)), "gain_std": stats.mean_sd(gains)[1], "seeds": len(runs_)})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    h = sorted((r["tokens"], r["gold"]) for r in result["heuristic"])
    ax.plot(*zip(*h, strict=True), "o-", color="tab:gray", label="heuristic: prune below a confidence")
    ax.scatter([r["tokens"] for r in result["learned"]], [r["gold"] for r in result["learned"]], color="tab:blue",
               label="PPO pruner (each price and seed)")
    for name, r in result["fixed"].items():
        ax.scatter([r["tokens"]], [r["gold"]], marker="s", label=name)
    b = result["best_of_n"]
    gold = [r["gold"] for r in b["seeds"]]
    ax.errorbar([np.mean([r["tokens"] for r in b["seeds"]])], [np.mean(gold)], yerr=[stats.mean_sd(gold)[1]], fmt="D",
                color="tab:red", label=f"best-of-N from {b['teacher']} (mean ± std over seeds)")
    ax.set_xlabel(f"generated tokens over {result['test_problems']} held-out problems")
    ax.set_ylabel("gold traces found")
    ax.legend(fontsize=8)
    ax.set_title("learned vs heuristic pruning, replayed on complete search trees")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matched_table(result: dict) -> str:
    """The search against best-of-N at exactly its tokens per problem (`matched_comparison`)."""
    b = result["best_of_n"]

    def spread(values):
        mean, sd = stats.mean_sd(values)
        return f"{mean:.1f} ± {sd:.1f}" if len(values) > 1 else f"{mean:.1f}"

    lines = [f"Search vs best-of-N from {b['teacher']} at exactly the search's tokens on each held-out problem, the "
             "pruner's threshold chosen on the training trees (per price); best-of-N plain and with the same pruner "
             f"on its samples (which may run out of samples below the tokens: then its tokens are in brackets); mean ± "
             f"sd over {len(b['seeds'])} seeds; gold (distinct texts) / solved:", "",
             "| price | threshold | tokens | search gold / solved | best-of-N | best-of-N, pruned | "
             "search − pruned best-of-N, solved [95%] |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["matched_best_of_n"]:
        cells = [f"{spread(r[n]['gold'])} ({spread(r[n]['distinct'])}) / {spread(r[n]['solved'])}"
                 + (f" [{np.mean(r[n]['tokens']):.0f} tokens]" if min(r[n]["tokens"]) < r["tokens"] else "")
                 for n in ("best_of_n", "best_of_n_filtered")]
        d, problems = r["best_of_n_filtered"]["search_minus_solved"], r["problems"]  # per problem -> problems
        search = r["search"]
        lines.append(f"| {r['alpha']:g} | {r['threshold']:.2f} | {r['tokens']} | {search['gold']} "
                     f"({search['distinct']}) / {search['solved']} | {cells[0]} | {cells[1]} | "
                     f"{problems * d['mean']:+.1f} [{problems * d['low']:+.1f}, {problems * d['high']:+.1f}] |")
    return "\n".join(lines)


def held_out_table(result: dict) -> str:
    """docs/teachers.md's table: every method on the held-out trees, the pruner at the threshold chosen on
    the training trees per price, PPO and best-of-N as mean ± sd over seeds."""
    def row(name, rs):
        gold, tokens = [r["gold"] for r in rs], [r["tokens"] for r in rs]
        per_1k = [1000 * g / max(t, 1) for g, t in zip(gold, tokens, strict=True)]
        cells = [stats.mean_sd(v) for v in (gold, tokens, per_1k, [r["solved"] for r in rs])]
        return (f"| {name} | " + " | ".join(f"{m:,.{d}f}" + (f" ± {sd:.{d}f}" if len(rs) > 1 else "")
                                            for (m, sd), d in zip(cells, (1, 0, 1, 1), strict=True)) + " |")

    b = result["best_of_n"]
    lines = [f"{result['test_problems']} held-out trees ({result['train_problems']} training trees fit the PPO "
             "weights and the pruner's threshold, per price); mean ± sd over seeds:", "",
             "| policy | gold traces | tokens | gold per 1k tokens | problems solved |", "|---|---:|---:|---:|---:|"]
    lines += [row(name, [r]) for name, r in result["fixed"].items()]
    for h in result["tuned_heuristic"]:
        lines.append(row(f"confidence pruner at {h['threshold']:.2f} (chosen on the training trees at price "
                         f"{h['alpha']:g})", [h]))
    for alpha in sorted({r["alpha"] for r in result["learned"]}):
        mine = [r for r in result["learned"] if r["alpha"] == alpha]
        lines.append(row(f"PPO pruner, price {alpha:g} ({len(mine)} seeds)", mine))
    lines.append(row(f"best-of-N from {b['teacher']}, T = {b['temperature']}, the complete tree's tokens per "
                     f"problem ({len(b['seeds'])} seeds)", b["seeds"]))
    return "\n".join(lines)


def return_table(result: dict) -> str:
    """Return on the held-out trees per price, each method fitted on the training trees."""
    lines = ["Return on the held-out trees (gold - alpha * tokens / 1000), each method fitted on the training "
             "trees: PPO's weights, the heuristic's threshold (the best one there); mean ± sd over seeds:", "",
             "| price alpha | PPO return | PPO gold / tokens | heuristic threshold | heuristic return | "
             "heuristic gold / tokens |", "|---:|---:|---:|---:|---:|---:|"]
    for h in result["tuned_heuristic"]:
        mine = [r for r in result["learned"] if r["alpha"] == h["alpha"]]
        returns = [r["gold"] - h["alpha"] * r["tokens"] / 1000 for r in mine]
        lines.append(f"| {h['alpha']:g} | {np.mean(returns):.1f} ± {stats.mean_sd(returns)[1]:.1f} | "
                     f"{np.mean([r['gold'] for r in mine]):.1f} / {np.mean([r['tokens'] for r in mine]):.0f} | "
                     f"{h['threshold']:.2f} | {h['gold'] - h['alpha'] * h['tokens'] / 1000:.1f} | "
                     f"{h['gold']:.0f} / {h['tokens']:.0f} |")
    return "\n".join(lines)


def format_summary(result: dict, config, seconds: float) -> str:
    lines = [f"# Learned pruning: {result['train_problems']} training problems, {result['test_problems']} held out",
             "", f"Left out, the search never paused: {sum(map(len, result['never_paused']))} problems.",
             "", f"Complete trees recorded in {result['record_seconds']:.0f} s (right {config.search.right}, wrong "
             f"{config.search.wrong}, {config.search.max_levels} levels); PPO {result['ppo_seconds']:.0f} s.", "",
             "Held-out problems, gold traces and generated tokens in total:", "",
             "| policy | gold | tokens | gold per 1k tokens | solved |", "|---|---:|---:|---:|---:|"]
    rows = [(name, r) for name, r in result["fixed"].items()]
    b = result["best_of_n"]
    rows += [(f"best-of-N from {b['teacher']} (T = {b['temperature']}), seed {s}", r) for s, r in enumerate(b["seeds"])]
    rows += [(f"heuristic, prune below confidence {r['threshold']:.2f}", r) for r in result["heuristic"]]
    rows += [(f"PPO, alpha {r['alpha']:g}, seed {r['seed']}", r) for r in result["learned"]]
    for name, r in rows:
        lines.append(f"| {name} | {r['gold']:.0f} | {r['tokens']:.0f} | {1000 * r['gold'] / max(r['tokens'], 1):.2f} "
                     f"| {r['solved']} |")
    lines += ["", "At equal tokens (the heuristic's frontier interpolated at each PPO policy's tokens; mean ± std "
              "over seeds):", "", "| price alpha | tokens | PPO gold | heuristic gold | PPO - heuristic |",
              "|---:|---:|---:|---:|---:|"]
    for r in result["equal_tokens"]:
        lines.append(f"| {r['alpha']:g} | {r['tokens']:.0f} | {r['gold']:.1f} ± {r['gold_std']:.1f} | "
                     f"{r['heuristic_gold']:.1f} | {r['gain']:+.1f} ± {r['gain_std']:.1f} |")
    lines += ["", return_table(result)]
    lines += ["", matched_table(result), "", f"Total time {seconds:.0f} s. Plot: pruning.png."]
    return "\n".join(lines) + "\n"
