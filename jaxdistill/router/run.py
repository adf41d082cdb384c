"""`python -m jaxdistill route`: precompute -> PPO over an alpha sweep and seeds -> evaluation.

Writes to config.workdir: precompute/ (resumable), metrics.jsonl (one line per alpha, seed
and PPO update), policy/ (orbax checkpoint of every trained policy), results.json,
summary.md (the table, with bootstrap intervals over questions and the router against the
strongest baselines), cost_quality.png (the alpha sweep, with the area under each method's
cost-quality frontier) and training_curves.png (PPO along training, per alpha).
"""

from __future__ import annotations

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
from jaxdistill.router import env as env_lib
from jaxdistill.router.evaluate import (
    compare,
    curves,
    default_table,
    evaluate_all,
    family_table,
    frontier_auc,
    plot,
    summarize,
)
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
    return ppo.policy_graph(env, ppo_config), params, {"ppo_seconds": seconds, "ppo_steps": steps}, history


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


def run(config) -> dict:
    validate(config)
    return settings.run_in_workdir(config, lambda c, workdir: _route(c, Path(str(workdir))))


def _route(config, workdir: Path) -> dict:
    start = time.perf_counter()
    commit = runs.source_commit()  # the code this run loads, before anything can change it
    train_table, test_table = build_table(config, workdir)
    scale = env_lib.cost_scale(train_table, config.env.cost_scale)
    stats = env_lib.feature_stats(train_table)
    train_env, test_env = env_lib.make_env(train_table, scale, stats), env_lib.make_env(test_table, scale, stats)
    e = config.env
    rewards = env_lib.Rewards(alpha=e.alpha, beta=e.beta, gamma=e.gamma, p0=e.p0)
    alphas = np.array(sorted(set(config.alphas) | {e.alpha}), np.float32)
    seeds = config.seeds
    graphdef, params, timing, history = train_policies(config, train_env, rewards, alphas, seeds, workdir)
    per_alpha = evaluate_all(config, train_env, test_env, train_table, test_table, rewards, alphas, graphdef,
                             params, seeds)
    default = per_alpha[int(np.argmin(np.abs(alphas - e.alpha)))]
    t_max, names = test_env.t_max, train_table.expert_names
    method_curves = curves(per_alpha, t_max, names)
    max_cost = max(c for points in method_curves.values() for c, _ in points)
    aucs = {m: frontier_auc(points, max_cost) for m, points in method_curves.items()}
    plot(method_curves, aucs, workdir / "cost_quality.png",
         f"{config.data.source} data, alpha sweep {', '.join(f'{a:g}' for a in alphas)}")

    results = {
        "alphas": alphas.tolist(), "default_alpha": e.alpha, "cost_scale": scale, **timing,
        "per_alpha": [{m: summarize(o) for m, o in rows.items()} for rows in per_alpha],
        "auc": aucs, "curves": method_curves,
        # per test question at the default alpha: what each method delivered and along which path
        "questions": {"uids": test_table.uids, "families": test_table.families, "expert_names": names,
                      "t_max": t_max, "node": {m: [x["node"].tolist() for x in o] for m, o in default.items()},
                      "quality": {m: [x["quality"].tolist() for x in o] for m, o in default.items()}},
        "commit": commit,
    }
    families = sorted(set(test_table.families))
    summary = "\n".join([
        f"# Router on {config.data.source} ({len(train_table.uids)} train / {len(test_table.uids)} test questions)",
        "", f"experts: {', '.join(names)}; T_max {t_max}; knowledge transfer {config.knowledge_transfer}; "
        f"alpha {e.alpha}, beta {e.beta}, gamma {e.gamma}, p0 {e.p0}; {seeds} seeds; cost unit "
        f"{scale / 1e9:.2f} GFLOPs; task families: {', '.join(families) or '-'}", "",
        f"At alpha {e.alpha} (episodes end on STOP or at T_max; no method but the oracle reads a test label):", "",
        default_table(results), "", "Per task family (router paths over seeds and questions):", "",
        family_table(results), "",
        "Area under the cost-quality frontier (alpha sweep; budgets for round-robin and "
        "self-correction):", "", *[f"- {m}: {aucs[m]:.3f}" for m in sorted(aucs, key=aucs.get, reverse=True)],
        "", compare(default, method_curves, names, t_max), "",
        f"Total time {time.perf_counter() - start:.0f}s; PPO {timing['ppo_steps']:,} steps in "
        f"{timing['ppo_seconds']:.1f}s."])
    runs.atomic_write_text(workdir / "summary.md", summary + "\n")
    runs.atomic_write_text(workdir / "results.json", json.dumps(results, indent=1))
    updates = next(iter(history.values())).shape[-1]
    with runs.board(config, workdir) as board:
        board.curves(history, alphas)
        board.scalars({f"frontier auc/{m}": auc for m, auc in aucs.items()}, step=updates)
        board.publish(step=updates)
    print("\n" + summary)
    print(f"\n(written to {workdir}: summary.md, results.json, metrics.jsonl, cost_quality.png, "
          "training_curves.png, policy/, tensorboard/)")
    return results


