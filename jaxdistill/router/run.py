"""`python -m jaxdistill route`: precompute -> PPO over an alpha sweep and seeds -> evaluation.

Writes to config.workdir: precompute/ (resumable), metrics.jsonl (one line per alpha, seed
and PPO update), policy/ (orbax checkpoint of every trained policy), results.json,
summary.md (the table) and cost_quality.png (the alpha sweep, with the area under each
method's cost-quality frontier).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxdistill import runs
from jaxdistill.data.qa import load_questions
from jaxdistill.errors import ConfigError
from jaxdistill.eval import metrics
from jaxdistill.router import baselines, ppo
from jaxdistill.router import env as env_lib
from jaxdistill.router.experts import Encoder, ExpertConfig, ExpertPool
from jaxdistill.router.precompute import Table, precompute


def validate(config) -> None:
    """Every setting that can be checked without questions or models, checked before any work."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    e, p = config.env, config.precompute
    need(p.t_max >= 1, f"precompute.t_max must be >= 1 (expert calls per episode), got {p.t_max}.")
    need(p.chunk >= 1 and p.batch_size >= 1, "precompute.chunk and precompute.batch_size must be >= 1.")
    need(p.num_hosts >= 1 and 0 <= p.host < p.num_hosts,
         f"precompute.host must be in [0, num_hosts={p.num_hosts}), got {p.host}.")
    alphas = [e.alpha, *config.alphas]
    need(all(a >= 0 for a in alphas), f"env.alpha and alphas are prices of cost and must be >= 0, got {alphas}.")
    need(e.beta >= 0 and e.gamma >= 0, f"env.beta and env.gamma must be >= 0, got {e.beta} and {e.gamma}.")
    need(0 <= e.p0 <= 1, f"env.p0 is a quality threshold in [0, 1], got {e.p0}.")
    need(config.seeds >= 1, f"seeds must be >= 1, got {config.seeds}.")
    need(config.knn_k >= 1, f"knn_k must be >= 1, got {config.knn_k}.")
    need(len(config.experts) >= 1, "experts is empty: configure at least one expert.")
    try:
        ppo.PPOConfig.from_config(config.ppo)
        [ExpertConfig.from_config(dict(x)) for x in config.experts]
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_table(config, workdir: Path) -> tuple[Table, Table]:
    train_q, test_q = load_questions(config.data)
    if config.knn_k > len(train_q):
        raise ConfigError(f"knn_k={config.knn_k} exceeds the {len(train_q)} training questions; lower --config.knn_k.")
    where = lambda path: path.format(weights=config.get("weights", ""))  # noqa: E731  ("{weights}/..." paths)
    experts = [ExpertConfig.from_config({**e, "model": where(e["model"])}) for e in config.experts]
    pool = ExpertPool(experts, ktp_template=config.ktp_template, batch_size=config.precompute.batch_size)
    encoder = Encoder(where(config.encoder), batch_size=config.precompute.batch_size)
    embedding = metrics.EmbeddingSimilarity(Encoder(config.metric_encoder)) if config.metric_encoder else None
    p = config.precompute
    table = precompute(pool, encoder, train_q + test_q, workdir / "precompute", t_max=p.t_max, chunk=p.chunk,
                       seed=config.seed, host=p.host, num_hosts=p.num_hosts, embedding_metric=embedding)
    return table.subset(range(len(train_q))), table.subset(range(len(train_q), len(train_q) + len(test_q)))


def summarize(outcome: dict[str, np.ndarray]) -> dict[str, float]:
    return {"quality": float(outcome["quality"].mean()), "calls": float(outcome["calls"].mean()),
            "flops": float(outcome["flops"].mean()), "return": float(outcome["return"].mean())}


def frontier_auc(points: list[tuple[float, float]], max_cost: float) -> float:
    """Area under the best-quality-at-or-below-cost step curve on [0, max_cost], divided by max_cost."""
    area, best = 0.0, 0.0
    ordered = sorted(points) + [(max_cost, None)]
    for (cost, quality), (next_cost, _) in zip(ordered[:-1], ordered[1:], strict=True):
        best = max(best, quality)
        area += best * (min(next_cost, max_cost) - min(cost, max_cost))
    return area / max_cost if max_cost > 0 else 0.0


def train_policies(config, env: env_lib.Env, rewards: env_lib.Rewards, alphas: np.ndarray, seeds: int, workdir: Path):
    """All (alpha, seed) policies in one jitted call; writes metrics.jsonl and the orbax checkpoint."""
    ppo_config = ppo.PPOConfig.from_config(config.ppo)
    train = ppo.make_train(ppo_config, env, rewards)
    keys = jax.random.split(jax.random.key(config.seed), seeds)
    run_all = jax.jit(jax.vmap(jax.vmap(train, in_axes=(0, None)), in_axes=(None, 0)))
    steps = ppo_config.num_updates * ppo_config.num_envs * ppo_config.num_steps * len(alphas) * seeds
    print(f"ppo: {len(alphas)} alphas x {seeds} seeds x {ppo_config.num_updates} updates "
          f"({steps:,} environment steps) in one jitted call", flush=True)
    start = time.perf_counter()
    params, history = jax.block_until_ready(run_all(keys, jnp.asarray(alphas, jnp.float32)))
    seconds = time.perf_counter() - start
    print(f"ppo: done in {seconds:.1f}s (compile included), {steps / seconds:,.0f} steps/s", flush=True)
    history = jax.tree.map(np.asarray, history)
    with open(workdir / "metrics.jsonl", "w") as f:
        for a, alpha in enumerate(alphas):
            for s in range(seeds):
                for u in range(ppo_config.num_updates):
                    row = {"alpha": float(alpha), "seed": s, "update": u}
                    row |= {k: float(v[a, s, u]) for k, v in history.items()}
                    f.write(json.dumps(row) + "\n")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(workdir / "policy", params, force=True)
    checkpointer.wait_until_finished()
    return ppo.policy_graph(env, ppo_config), params, {"ppo_seconds": seconds, "ppo_steps": steps}


def evaluate_all(config, train_env, test_env, train_table, test_table, rewards, alphas, graphdef, params, seeds):
    """Per alpha, {method: [one {quality, calls, flops, return} per seed]}; budgets are methods of their own."""
    n, t_max = test_env.n_experts, test_env.t_max
    names = train_table.expert_names
    key = jax.random.key(config.seed + 1)
    all_plans = baselines.all_plans(n, t_max)
    per_alpha = []
    for a, alpha in enumerate(alphas):
        r = rewards.replace(alpha=float(alpha))
        rows: dict[str, list[dict]] = {}
        rows["router (PPO)"] = [summarize(env_lib.evaluate(
            test_env, r, ppo.greedy_policy(graphdef, ppo.select(params, a, s)), key))
            for s in range(seeds)]
        train_plans = baselines.plan_outcomes(train_env, r)
        test_plans = baselines.plan_outcomes(test_env, r)
        knn = baselines.knn_choice(train_table.question_emb, train_plans["return"], test_table.question_emb,
                                   config.knn_k)
        rows["kNN router"] = [summarize(env_lib.evaluate(test_env, r, baselines.plan_policy(all_plans, knn), key))]
        rows["oracle path"] = [summarize(env_lib.evaluate(
            test_env, r, baselines.plan_policy(all_plans, baselines.oracle_choice(test_plans)), key))]
        rows["random"] = [summarize(env_lib.evaluate(test_env, r, baselines.random_policy(n),
                                                     jax.random.fold_in(key, s))) for s in range(seeds)]
        for i, name in enumerate(names):
            rows[f"single: {name}"] = [summarize(env_lib.evaluate(test_env, r, baselines.single_expert(i, n), key))]
        for budget in range(1, t_max + 1):
            rows[f"round-robin x{budget}"] = [summarize(env_lib.evaluate(
                test_env, r, baselines.round_robin(n, budget), key))]
            for i, name in enumerate(names):
                rows[f"self-correction: {name} x{budget}"] = [summarize(env_lib.evaluate(
                    test_env, r, baselines.self_correction(i, n, budget), key))]
        per_alpha.append(rows)
    return per_alpha


def mean_spread(runs: list[dict], field: str) -> tuple[float, float]:
    values = np.array([r[field] for r in runs])
    return float(values.mean()), float(values.std())


def curves(per_alpha, alphas, t_max: int, names: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Each method's (mean FLOPs, mean quality) points: over alphas for the learned/plan methods,
    over budgets for round-robin and self-correction, single points for the rest."""
    point = lambda runs: (mean_spread(runs, "flops")[0], mean_spread(runs, "quality")[0])  # noqa: E731
    out = {m: [point(rows[m]) for rows in per_alpha] for m in ("router (PPO)", "kNN router", "oracle path")}
    first = per_alpha[0]
    out["round-robin"] = [point(first[f"round-robin x{b}"]) for b in range(1, t_max + 1)]
    for name in names:
        out[f"single: {name}"] = [point(first[f"single: {name}"])]
        out[f"self-correction: {name}"] = [point(first[f"self-correction: {name} x{b}"]) for b in range(1, t_max + 1)]
    out["random"] = [point(first["random"])]
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


def format_table(rows: dict[str, list[dict]], seeds: int) -> str:
    lines = ["| method | quality | calls | cost (GFLOPs) | return |", "|---|---:|---:|---:|---:|"]
    for method, outcomes in rows.items():
        cells = []
        for field, scale, digits in (("quality", 1, 3), ("calls", 1, 2), ("flops", 1e9, 2), ("return", 1, 3)):
            mean, spread = mean_spread(outcomes, field)
            cells.append(f"{mean / scale:.{digits}f} ± {spread / scale:.{digits}f}" if len(outcomes) > 1
                         else f"{mean / scale:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"\n± is the standard deviation over {seeds} seeds (training seeds for the router, rollout seeds "
                 "for random); the other baselines are deterministic.")
    return "\n".join(lines)


def run(config) -> dict:
    validate(config)
    workdir = runs.open_workdir(config.workdir)
    with runs.WorkdirLock(workdir):
        return _route(config, Path(str(workdir)))


def _route(config, workdir: Path) -> dict:
    start = time.perf_counter()
    train_table, test_table = build_table(config, workdir)
    scale = env_lib.cost_scale(train_table, config.env.cost_scale)
    stats = env_lib.feature_stats(train_table)
    train_env, test_env = env_lib.make_env(train_table, scale, stats), env_lib.make_env(test_table, scale, stats)
    e = config.env
    rewards = env_lib.Rewards(alpha=e.alpha, beta=e.beta, gamma=e.gamma, p0=e.p0)
    alphas = np.array(sorted(set(config.alphas) | {e.alpha}), np.float32)
    seeds = config.seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    graphdef, params, timing = train_policies(config, train_env, rewards, alphas, seeds, workdir)
    per_alpha = evaluate_all(config, train_env, test_env, train_table, test_table, rewards, alphas, graphdef,
                             params, seeds)
    default = per_alpha[int(np.argmin(np.abs(alphas - e.alpha)))]
    t_max, names = test_env.t_max, train_table.expert_names
    method_curves = curves(per_alpha, alphas, t_max, names)
    max_cost = max(c for points in method_curves.values() for c, _ in points)
    aucs = {m: frontier_auc(points, max_cost) for m, points in method_curves.items()}
    plot(method_curves, aucs, workdir / "cost_quality.png",
         f"{config.data.source} data, alpha sweep {', '.join(f'{a:g}' for a in alphas)}")

    shown = ["router (PPO)", *[f"single: {n}" for n in names], f"round-robin x{t_max}",
             *[f"self-correction: {n} x{t_max}" for n in names], "random", "kNN router", "oracle path"]
    table_text = format_table({m: default[m] for m in shown}, seeds)
    families = sorted(set(test_table.families))
    verdict = compare_at_equal_cost(method_curves, names)
    summary = "\n".join([
        f"# Router on {config.data.source} ({len(train_table.uids)} train / {len(test_table.uids)} test questions)",
        "", f"experts: {', '.join(names)}; T_max {t_max}; alpha {e.alpha}, beta {e.beta}, gamma {e.gamma}, "
        f"p0 {e.p0}; cost unit {scale / 1e9:.2f} GFLOPs; task families: {', '.join(families) or '-'}", "",
        table_text, "", "Area under the cost-quality frontier (alpha sweep; budgets for round-robin and "
        "self-correction):", "", *[f"- {m}: {aucs[m]:.3f}" for m in sorted(aucs, key=aucs.get, reverse=True)],
        "", verdict, "", f"Total time {time.perf_counter() - start:.0f}s; PPO {timing['ppo_steps']:,} steps in "
        f"{timing['ppo_seconds']:.1f}s."])
    (workdir / "summary.md").write_text(summary + "\n")
    results = {"alphas": alphas.tolist(), "per_alpha": per_alpha, "auc": aucs, "curves": method_curves,
               "cost_scale": scale, **timing}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + summary)
    print(f"\n(written to {workdir}: summary.md, results.json, metrics.jsonl, cost_quality.png, policy/)")
    return results


def compare_at_equal_cost(method_curves, names) -> str:
    """Router quality at (or below) the cost of round-robin and of the best single expert."""
    router = method_curves["router (PPO)"]

    def router_at(cost):
        affordable = [q for c, q in router if c <= cost * 1.0001]
        return max(affordable) if affordable else None

    lines = []
    best_single = max(names, key=lambda n: method_curves[f"single: {n}"][0][1])
    knn_best = max(method_curves["kNN router"], key=lambda point: point[1])
    for label, (cost, quality) in [("round-robin (full budget)", method_curves["round-robin"][-1]),
                                   (f"the best single expert ({best_single})",
                                    method_curves[f"single: {best_single}"][0]),
                                   ("the kNN router (its best point)", knn_best)]:
        mine = router_at(cost)
        if mine is None:
            lines.append(f"- vs {label}: no router point is as cheap as {cost / 1e9:.2f} GFLOPs.")
        else:
            word = "beats" if mine > quality + 1e-9 else ("ties" if abs(mine - quality) <= 1e-9 else "loses to")
            lines.append(f"- vs {label}: the router {word} it at equal or lower cost "
                         f"({mine:.3f} vs {quality:.3f} quality at <= {cost / 1e9:.2f} GFLOPs).")
    return "Router at equal cost:\n" + "\n".join(lines)
