"""The router's evaluation on held-out questions: the trained policies against every baseline
through the same environment (each single expert, self-correction, round-robin, random, kNN and
the oracle path), means over seeds with bootstrap intervals over questions, cost-quality
curves and the area under them, and the paired comparison of the router with the strongest
baselines."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import numpy as np

from jaxdistill import stats
from jaxdistill.rl import ppo
from jaxdistill.router import baselines
from jaxdistill.router import env as env_lib

FIELDS = ("quality", "calls", "flops", "return")
ROUTER, KNN, ORACLE = "router (PPO)", "kNN router", "oracle path (reads test labels)"  # method rows


def summarize(outcomes: list[dict[str, np.ndarray]]) -> dict:
    """Means over questions and runs (seeds), the sample standard deviation over runs (0 for one
    run), and the 95% interval of the quality resampling questions."""
    out = {"cost": float(np.mean([o["cost"].mean() for o in outcomes])), "runs": len(outcomes)}  # cost: alpha's units
    for field in FIELDS:
        out[field], sd = stats.mean_sd([o[field].mean() for o in outcomes])
        out[f"{field}_std"] = sd if len(outcomes) > 1 else 0.0
    out["quality_ci"] = bootstrap_interval([o["quality"] for o in outcomes])
    return out


def bootstrap_interval(per_question: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over questions (per_question: [Q], or [runs, Q] averaged first)."""
    values = np.asarray(per_question, np.float64).reshape(-1, np.shape(per_question)[-1]).mean(axis=0)
    found = stats.bootstrap(values[None], draws=samples, seed=seed)
    return found["low"], found["high"]


def frontier_auc(points: list[tuple[float, float]], max_cost: float) -> float:
    """Area under the best-quality-at-or-below-cost step curve on [0, max_cost], divided by max_cost."""
    area, best = 0.0, 0.0
    ordered = sorted(points) + [(max_cost, None)]
    for (cost, quality), (next_cost, _) in zip(ordered[:-1], ordered[1:], strict=True):
        best = max(best, quality)
        area += best * (min(next_cost, max_cost) - min(cost, max_cost))
    return area / max_cost if max_cost > 0 else 0.0


def round_robin_orders(n: int, budget: int) -> list[tuple[int, ...]]:
    """Every distinct round-robin schedule of `budget` calls: orders of min(budget, n) experts."""
    return list(itertools.permutations(range(n), min(budget, n)))


def evaluate_all(config, train_env, test_env, train_table, test_table, rewards, alphas, graphdef, params, seeds):
    """Per alpha, {method: [per-question outcome arrays, one dict per run]}.

    Every method runs through the same environment, whose episodes never read a reference
    (see env.py); the oracle alone chooses its plan from the test references, as an upper
    bound. Round-robin's order is chosen by training quality (the mean over orders is a row
    too); random STOPs with the probability that matches the router's mean calls; kNN and the
    oracle choose plans by quality at the alpha's price per unit of cost.
    """
    n, t_max = test_env.n_experts, test_env.t_max
    names = train_table.expert_names
    key = jax.random.key(config.seed + 1)
    all_plans = baselines.all_plans(n, t_max)
    run = lambda env, r, policy, k=key: env_lib.evaluate(env, r, policy, k)  # noqa: E731
    per_alpha = []
    for a, alpha in enumerate(alphas):
        r = rewards.replace(alpha=float(alpha))
        rows: dict[str, list[dict]] = {}
        rows[ROUTER] = [run(test_env, r, ppo.greedy_policy(graphdef, ppo.select(params, a, s)))
                        for s in range(seeds)]
        train_plans, test_plans = baselines.plan_outcomes(train_env, r), baselines.plan_outcomes(test_env, r)
        knn = baselines.knn_choice(train_table.question_emb, train_plans, test_table.question_emb, config.knn_k,
                                   float(alpha))
        rows[KNN] = [run(test_env, r, baselines.plan_policy(all_plans, knn))]
        rows[ORACLE] = [run(test_env, r, baselines.plan_policy(
            all_plans, baselines.oracle_choice(test_plans, float(alpha))))]
        router_calls = float(np.mean([o["calls"].mean() for o in rows[ROUTER]]))
        stop = baselines.stop_probability_for(router_calls, t_max)
        rows["random (router's mean calls)"] = [run(test_env, r, baselines.random_policy(n, stop),
                                                    jax.random.fold_in(key, s)) for s in range(seeds)]
        for i, name in enumerate(names):
            rows[f"single: {name}"] = [run(test_env, r, baselines.single_expert(i, n))]
        for budget in range(2, t_max + 1):
            orders = round_robin_orders(n, budget)
            train_quality = [run(train_env, r, baselines.round_robin(o, n, budget))["quality"].mean() for o in orders]
            best = orders[int(np.argmax(train_quality))]
            rows[f"round-robin x{budget} (best order on train)"] = [run(test_env, r,
                                                                        baselines.round_robin(best, n, budget))]
            rows[f"round-robin x{budget} (mean over orders)"] = [run(test_env, r, baselines.round_robin(o, n, budget))
                                                                 for o in orders]
            for i, name in enumerate(names):
                rows[f"self-correction: {name} x{budget}"] = [run(test_env, r,
                                                                  baselines.self_correction(i, n, budget))]
        per_alpha.append(rows)
    return per_alpha


def point(outcomes) -> tuple[float, float]:
    summary = summarize(outcomes)
    return summary["flops"], summary["quality"]


def curves(per_alpha, t_max: int, names: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Each method's (mean FLOPs, mean quality) points: over alphas for the router, kNN, the oracle
    and matched random; over budgets for round-robin and self-correction; single points for the rest."""
    learned = (ROUTER, KNN, ORACLE, "random (router's mean calls)")
    out = {m: [point(rows[m]) for rows in per_alpha] for m in learned}
    first = per_alpha[0]
    for name in names:
        out[f"single: {name}"] = [point(first[f"single: {name}"])]
        out[f"self-correction: {name}"] = [point(first[f"single: {name}"])] + [
            point(first[f"self-correction: {name} x{b}"]) for b in range(2, t_max + 1)]
    if t_max >= 2:
        out["round-robin (best order)"] = [point(first[f"round-robin x{b} (best order on train)"])
                                           for b in range(2, t_max + 1)]
    return out


def plot(method_curves, aucs, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, points in method_curves.items():
        xs, ys = zip(*sorted(points), strict=True)
        style = "o-" if len(points) > 1 else "s"
        ax.plot(np.array(xs) / 1e9, ys, style, label=f"{method} (AUC {aucs[method]:.3f})", markersize=4)
    ax.set_xlabel("average cost per question (GFLOPs)")
    ax.set_ylabel("average quality")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summaries: dict[str, dict]) -> str:
    """Methods' `summarize` rows as a table (a run's summary.md, and docs/router.md from its results.json)."""
    lines = ["| method | quality | 95% CI (questions) | calls | cost (GFLOPs) | return |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, summary in summaries.items():
        cells = []
        for field, scale, digits in (("quality", 1, 3), ("calls", 1, 2), ("flops", 1e9, 2), ("return", 1, 3)):
            mean, spread = summary[field] / scale, summary[f"{field}_std"] / scale
            cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}" if summary["runs"] > 1 else f"{mean:.{digits}f}")
        low, high = summary["quality_ci"]
        cells.insert(1, f"{low:.3f}-{high:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("\n± is the sample standard deviation over runs (training seeds for the router, rollout seeds for "
                 "random, orders for the round-robin mean); the CI resamples questions (bootstrap, 2000 draws).")
    return "\n".join(lines)


def compare(rows: dict[str, list[dict]], method_curves, names: list[str], t_max: int) -> str:
    """The router against the strongest baselines at the default alpha, paired over questions, and
    at equal cost on the frontier."""
    router = np.mean([o["quality"] for o in rows[ROUTER]], axis=0)
    router_cost = summarize(rows[ROUTER])["flops"]
    quality = lambda m: summarize(rows[m])["quality"]  # noqa: E731
    best_single = max((f"single: {n}" for n in names), key=quality)
    candidates = [best_single, KNN]
    if t_max >= 2:
        candidates.append(max((f"self-correction: {n} x{b}" for n in names for b in range(2, t_max + 1)),
                              key=quality))
        candidates.append(max((f"round-robin x{b} (best order on train)" for b in range(2, t_max + 1)), key=quality))
    lines = ["Router vs the strongest baselines (best single expert and self-correction chosen on test, so at "
             "their best): quality difference, paired 95% CI over questions, and the router's best point on its "
             "alpha sweep at or below the baseline's cost:", ""]
    for method in candidates:
        other = np.mean([o["quality"] for o in rows[method]], axis=0)
        low, high = bootstrap_interval(router - other)
        word = "better" if low > 0 else ("worse" if high < 0 else "no significant difference")
        cost = summarize(rows[method])["flops"]
        affordable = [q for c, q in method_curves[ROUTER] if c <= cost * 1.0001]
        frontier = (f"router's best at <= {cost / 1e9:.1f} GFLOPs: {max(affordable):.3f}" if affordable
                    else f"no router point at <= {cost / 1e9:.1f} GFLOPs")
        lines.append(f"- vs {method}: {router.mean() - other.mean():+.3f} [{low:+.3f}, {high:+.3f}] -> {word} "
                     f"(router {router_cost / 1e9:.1f} vs {cost / 1e9:.1f} GFLOPs; {frontier} vs "
                     f"{other.mean():.3f})")
    return "\n".join(lines)


def default_table(results: dict) -> str:
    """The methods at the default alpha, from a route run's results.json (docs/router.md)."""
    at = int(np.argmin(np.abs(np.asarray(results["alphas"]) - results["default_alpha"])))
    return format_table(results["per_alpha"][at])


def sweep_table(results: dict) -> str:
    """Router, kNN and oracle over the alpha sweep, from a route run's results.json."""
    lines = ["| α | router quality | router GFLOPs | router calls | kNN quality | kNN GFLOPs | oracle quality | "
             "oracle GFLOPs |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for alpha, rows in zip(results["alphas"], results["per_alpha"], strict=True):
        router, knn, oracle = rows[ROUTER], rows[KNN], rows[ORACLE]
        lines.append(f"| {alpha:g} | {router['quality']:.3f} ± {router['quality_std']:.3f} | "
                     f"{router['flops'] / 1e9:.1f} | {router['calls']:.2f} | {knn['quality']:.3f} | "
                     f"{knn['flops'] / 1e9:.1f} | {oracle['quality']:.3f} | {oracle['flops'] / 1e9:.1f} |")
    return "\n".join(lines)


def family_table(results: dict) -> str:
    """Per task family at the default alpha: the router's most common final paths (over seeds and
    questions) and each method's mean quality, from a route run's results.json."""
    from jaxdistill.router.precompute import path_of

    q = results["questions"]
    names, families = q["expert_names"], np.asarray(q["families"])
    singles = [f"single: {name}" for name in names]
    lines = [f"| family | most common router paths | router | kNN | {' | '.join(names)} | oracle |",
             "|---|---|" + "---:|" * (len(names) + 3)]
    for family in sorted(set(q["families"])):
        rows = families == family
        nodes = np.asarray(q["node"][ROUTER])[:, rows].ravel()
        counts = sorted(((int((nodes == m).sum()), m) for m in set(nodes.tolist())), reverse=True)[:2]
        paths = [" → ".join(names[a] for a in path_of(int(m), len(names))) or "STOP at once" for _, m in counts]
        common = "; ".join(f"{p} ({c}/{nodes.size})" for p, (c, _) in zip(paths, counts, strict=True))
        quality = [np.asarray(q["quality"][m])[:, rows].mean() for m in (ROUTER, KNN, *singles, ORACLE)]
        lines.append(f"| {family} | {common} | " + " | ".join(f"{x:.2f}" for x in quality) + " |")
    return "\n".join(lines)
