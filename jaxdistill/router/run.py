"""`python -m jaxdistill route`: precompute -> PPO over an alpha sweep and seeds -> evaluation.

Writes to config.workdir: precompute/ (resumable), metrics.jsonl (one line per alpha, seed
and PPO update), policy/ (orbax checkpoint of every trained policy), results.json,
summary.md (the table, with bootstrap intervals over questions and the router against the
strongest baselines), cost_quality.png (the alpha sweep, with the area under each method's
cost-quality frontier) and training_curves.png (PPO along training, per alpha).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxdistill import runs, settings
from jaxdistill.data import metrics
from jaxdistill.data.qa import load_questions
from jaxdistill.errors import ConfigError
from jaxdistill.rl import ppo
from jaxdistill.router import baselines
from jaxdistill.router import env as env_lib
from jaxdistill.router.experts import Encoder, ExpertConfig, ExpertPool
from jaxdistill.router.precompute import Table, precompute

# Data settings only some sources read (settings.check_unused): set with another source, they are an error.
UNUSED = (
    *(settings.Unused(f"data.{key}", "", lambda c: c.data.source == "jsonl",
                      lambda c: f"only data.source=jsonl reads it and data.source is {c.data.source!r}; add "
                                "--config.data.source=jsonl") for key in ("train_path", "test_path")),
    *(settings.Unused(f"data.{key}", unset, lambda c: c.data.source == "tfds",
                      lambda c: f"only data.source=tfds reads it and data.source is {c.data.source!r}; add "
                                "--config.data.source=tfds")
      for key, unset in (("tfds_data_dir", ""), ("test_split", "validation"))),
    settings.Unused("data.dataset", "", lambda c: c.data.source in ("jsonl", "tfds"),
                    lambda c: "data.source='synthetic' generates its own questions; add --config.data.source=jsonl "
                              "or tfds"),
)


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
    settings.check_unused(config, UNUSED)
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
    if not config.knowledge_transfer and any(e.temperature > 0 for e in experts):
        raise ConfigError("knowledge_transfer=False derives each call from the expert's first answer, which "
                          "needs greedy experts (temperature 0); set the experts' temperature to 0.")
    pool = ExpertPool(experts, ktp_template=config.ktp_template, batch_size=config.precompute.batch_size)
    encoder = Encoder(where(config.encoder), batch_size=config.precompute.batch_size)
    embedding = metrics.EmbeddingSimilarity(Encoder(config.metric_encoder)) if config.metric_encoder else None
    p = config.precompute
    directory = Path(p.dir) if p.dir else workdir / "precompute"
    table = precompute(pool, encoder, train_q + test_q, directory, t_max=p.t_max, chunk=p.chunk,
                       seed=config.seed, host=p.host, num_hosts=p.num_hosts, embedding_metric=embedding)
    if not config.knowledge_transfer:
        table = table.without_transfer()
    return table.subset(range(len(train_q))), table.subset(range(len(train_q), len(train_q) + len(test_q)))


FIELDS = ("quality", "calls", "flops", "return")


def summarize(outcomes: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Means over questions and runs (seeds), with the spread over runs."""
    out = {"cost": float(np.mean([o["cost"].mean() for o in outcomes]))}  # normalised units (alpha's price)
    for field in FIELDS:
        per_run = np.array([o[field].mean() for o in outcomes])
        out[field], out[f"{field}_std"] = float(per_run.mean()), float(per_run.std())
    return out


def bootstrap_interval(per_question: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over questions (per_question: [Q], or [runs, Q] averaged first)."""
    values = np.asarray(per_question, np.float64).reshape(-1, np.shape(per_question)[-1]).mean(axis=0)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    means = values[draws].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


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
    train = ppo.make_train(ppo_config, env, rewards, env_lib)
    keys = jax.random.split(jax.random.key(config.seed), seeds)
    steps = ppo_config.num_updates * ppo_config.num_envs * ppo_config.num_steps * len(alphas) * seeds
    print(f"ppo: {len(alphas)} alphas x {seeds} seeds x {ppo_config.num_updates} updates "
          f"({steps:,} environment steps) in one jitted call", flush=True)
    start = time.perf_counter()
    states, history = jax.block_until_ready(ppo.train_grid(train, env, keys, jnp.asarray(alphas, jnp.float32)))
    params = states.params
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
    plot_training(history, alphas, ppo_config, workdir / "training_curves.png")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(workdir / "policy", params, force=True)
    checkpointer.wait_until_finished()
    return ppo.policy_graph(env, ppo_config), params, {"ppo_seconds": seconds, "ppo_steps": steps}


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
        rows["router (PPO)"] = [run(test_env, r, ppo.greedy_policy(graphdef, ppo.select(params, a, s)))
                                for s in range(seeds)]
        train_plans, test_plans = baselines.plan_outcomes(train_env, r), baselines.plan_outcomes(test_env, r)
        knn = baselines.knn_choice(train_table.question_emb, train_plans, test_table.question_emb, config.knn_k,
                                   float(alpha))
        rows["kNN router"] = [run(test_env, r, baselines.plan_policy(all_plans, knn))]
        rows["oracle path (reads test labels)"] = [run(test_env, r, baselines.plan_policy(
            all_plans, baselines.oracle_choice(test_plans, float(alpha))))]
        router_calls = float(np.mean([o["calls"].mean() for o in rows["router (PPO)"]]))
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
    learned = ("router (PPO)", "kNN router", "oracle path (reads test labels)", "random (router's mean calls)")
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


def plot_training(history: dict[str, np.ndarray], alphas: np.ndarray, ppo_config: ppo.PPOConfig, path: Path) -> None:
    """Episode return and quality along PPO training, one line per alpha (mean over seeds, band = min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = (np.arange(ppo_config.num_updates) + 1) * ppo_config.num_envs * ppo_config.num_steps
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, field in zip(axes, ("episode_return", "episode_quality", "episode_calls"), strict=True):
        for a, alpha in enumerate(alphas):
            values = history[field][a]  # [seeds, updates]
            line, = ax.plot(steps, values.mean(axis=0), label=f"alpha {alpha:g}")
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("environment steps")
        ax.set_title(field.replace("_", " ") + " (training questions)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: dict[str, list[dict]]) -> str:
    lines = ["| method | quality | 95% CI (questions) | calls | cost (GFLOPs) | return |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, outcomes in rows.items():
        summary, (low, high) = summarize(outcomes), bootstrap_interval([o["quality"] for o in outcomes])
        cells = []
        for field, scale, digits in (("quality", 1, 3), ("calls", 1, 2), ("flops", 1e9, 2), ("return", 1, 3)):
            mean, spread = summary[field] / scale, summary[f"{field}_std"] / scale
            cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(outcomes) > 1 else f"{mean:.{digits}f}")
        cells.insert(1, f"{low:.3f}-{high:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("\n± is the standard deviation over runs (training seeds for the router, rollout seeds for "
                 "random, orders for the round-robin mean); the CI resamples questions (bootstrap, 2000 draws).")
    return "\n".join(lines)


def run(config) -> dict:
    validate(config)
    return settings.run_in_workdir(config, lambda c, workdir: _route(c, Path(str(workdir))))


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
    graphdef, params, timing = train_policies(config, train_env, rewards, alphas, seeds, workdir)
    per_alpha = evaluate_all(config, train_env, test_env, train_table, test_table, rewards, alphas, graphdef,
                             params, seeds)
    default = per_alpha[int(np.argmin(np.abs(alphas - e.alpha)))]
    t_max, names = test_env.t_max, train_table.expert_names
    method_curves = curves(per_alpha, t_max, names)
    max_cost = max(c for points in method_curves.values() for c, _ in points)
    aucs = {m: frontier_auc(points, max_cost) for m, points in method_curves.items()}
    plot(method_curves, aucs, workdir / "cost_quality.png",
         f"{config.data.source} data, alpha sweep {', '.join(f'{a:g}' for a in alphas)}")

    families = sorted(set(test_table.families))
    summary = "\n".join([
        f"# Router on {config.data.source} ({len(train_table.uids)} train / {len(test_table.uids)} test questions)",
        "", f"experts: {', '.join(names)}; T_max {t_max}; knowledge transfer {config.knowledge_transfer}; "
        f"alpha {e.alpha}, beta {e.beta}, gamma {e.gamma}, p0 {e.p0}; {seeds} seeds; cost unit "
        f"{scale / 1e9:.2f} GFLOPs; task families: {', '.join(families) or '-'}", "",
        f"At alpha {e.alpha} (episodes end on STOP or at T_max; no method but the oracle reads a test label):", "",
        format_table(default), "", "Area under the cost-quality frontier (alpha sweep; budgets for round-robin and "
        "self-correction):", "", *[f"- {m}: {aucs[m]:.3f}" for m in sorted(aucs, key=aucs.get, reverse=True)],
        "", compare(default, method_curves, names, t_max), "",
        f"Total time {time.perf_counter() - start:.0f}s; PPO {timing['ppo_steps']:,} steps in "
        f"{timing['ppo_seconds']:.1f}s."])
    runs.atomic_write_text(workdir / "summary.md", summary + "\n")
    results = {
        "alphas": alphas.tolist(), "default_alpha": e.alpha, "cost_scale": scale, **timing,
        "per_alpha": [{m: {**summarize(o), "quality_ci": bootstrap_interval([x["quality"] for x in o])}
                       for m, o in rows.items()} for rows in per_alpha],
        "auc": aucs, "curves": method_curves,
        # per test question at the default alpha: what each method delivered and along which path
        "questions": {"uids": test_table.uids, "families": test_table.families, "expert_names": names,
                      "t_max": t_max, "node": {m: [x["node"].tolist() for x in o] for m, o in default.items()},
                      "quality": {m: [x["quality"].tolist() for x in o] for m, o in default.items()}},
    }
    runs.atomic_write_text(workdir / "results.json", json.dumps(results, indent=1))
    print("\n" + summary)
    print(f"\n(written to {workdir}: summary.md, results.json, metrics.jsonl, cost_quality.png, "
          "training_curves.png, policy/)")
    return results


def compare(rows: dict[str, list[dict]], method_curves, names: list[str], t_max: int) -> str:
    """The router against the strongest baselines at the default alpha, paired over questions, and
    at equal cost on the frontier."""
    router = np.mean([o["quality"] for o in rows["router (PPO)"]], axis=0)
    router_cost = summarize(rows["router (PPO)"])["flops"]
    quality = lambda m: summarize(rows[m])["quality"]  # noqa: E731
    best_single = max((f"single: {n}" for n in names), key=quality)
    candidates = [best_single, "kNN router"]
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
        affordable = [q for c, q in method_curves["router (PPO)"] if c <= cost * 1.0001]
        frontier = (f"router's best at <= {cost / 1e9:.1f} GFLOPs: {max(affordable):.3f}" if affordable
                    else f"no router point at <= {cost / 1e9:.1f} GFLOPs")
        lines.append(f"- vs {method}: {router.mean() - other.mean():+.3f} [{low:+.3f}, {high:+.3f}] -> {word} "
                     f"(router {router_cost / 1e9:.1f} vs {cost / 1e9:.1f} GFLOPs; {frontier} vs "
                     f"{other.mean():.3f})")
    return "\n".join(lines)
