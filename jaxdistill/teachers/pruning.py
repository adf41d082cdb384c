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
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from jaxdistill import runs, settings
from jaxdistill.errors import ConfigError
from jaxdistill.rl import ppo
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import run as teachers_run
from jaxdistill.teachers import search as search_lib
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack

EXPAND, CONTINUE, PRUNE = 0, 1, 2
FEATURES = ("top1", "top2", "entropy / 3", "agreement", "confidence", "path tokens / max_new_tokens",
            "level / max_levels", "wrong direction", "can expand")


@struct.dataclass
class Price:
    alpha: float = 1.0  # gold traces one would give up for 1,000 generated tokens


@struct.dataclass
class Trees:
    """Complete search trees of P problems, padded to M branches (ids in the search's order)."""

    children: jax.Array  # [P, M, K] int32, -1 = none; child 0 is the consensus (top) token
    pre: jax.Array  # [P, M] tokens the branch generates up to its pause (or its end, if it never pauses)
    post: jax.Array  # [P, M] tokens after a last-level pause, to the end
    decision: jax.Array  # [P, M] bool: the branch paused (a policy decides there)
    gold: jax.Array  # [P, M] bool: the branch ended in a verified answer
    features: jax.Array  # [P, M, F] at the pause
    n_actions: int = struct.field(pytree_node=False, default=3)

    @property
    def obs_dim(self) -> int:
        return self.features.shape[-1] + 2  # + tokens spent and gold found so far

    @property
    def n_problems(self) -> int:
        return self.pre.shape[0]

    @property
    def n_branches(self) -> int:
        return self.pre.shape[1]


def trees_from_searches(found: list[dict], config: search_lib.SearchConfig) -> Trees:
    """Arrays of saved complete searches (`teachers.run.search_saved`); every tree must pause at its root."""
    width, size = config.right + config.wrong, max(len(f["branches"]) for f in found)
    shape = (len(found), size)
    children = np.full((*shape, width), -1, np.int32)
    pre, post = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    decision, gold = np.zeros(shape, bool), np.zeros(shape, bool)
    features = np.zeros((*shape, len(FEATURES)), np.float32)
    for p, result in enumerate(found):
        if result["pruned"]:
            raise ConfigError(f"the search of {result['uid']} pruned {result['pruned']} branches: a tree for "
                              "replay must be complete (min_confidence 0, no token budget, max_live >= all leaves).")
        if result["branches"][0]["features"] is None:
            raise ConfigError(f"the search of {result['uid']} never paused: nothing to decide. Lower "
                              "search.branch_entropy or leave the problem out.")
        count = np.zeros(size, np.int32)
        for b in result["branches"]:
            i, f = b["id"], b["features"]
            if b["parent"] >= 0:
                children[p, b["parent"], count[b["parent"]]] = i
                count[b["parent"]] += 1
            paused_at = f["tokens"] if f else b["length"]
            pre[p, i], post[p, i] = paused_at - b["position"], b["length"] - paused_at
            if f:
                decision[p, i] = True
                features[p, i] = [f["top1"], f["top2"], f["entropy"] / 3, f["agreement"], f["confidence"],
                                  f["tokens"] / config.max_new_tokens, b["level"] / max(config.max_levels, 1),
                                  b["kind"] == "wrong", b["level"] < config.max_levels]
        for leaf in result["leaves"]:
            gold[p, leaf["branch"]] = leaf["correct"]
    return Trees(*(jnp.asarray(x) for x in (children, pre, post, decision, gold, features)))


@struct.dataclass
class State:
    problem: jax.Array  # int32
    alive: jax.Array  # [M] bool: the branch decodes (its parent's decision kept it)
    cursor: jax.Array  # int32: the branch whose pause is being decided; M once the search is over
    tokens: jax.Array  # float32, generated so far
    gold: jax.Array  # float32, gold traces reached so far


def _advance(trees: Trees, state: State, start) -> State:
    """Walk the live branches from `start` in id order, paying their tokens (and collecting gold from those
    that end without pausing), up to and including the next live pause."""
    p, m = state.problem, trees.n_branches

    def waiting(s: State):
        i = jnp.minimum(s.cursor, m - 1)
        return (s.cursor < m) & ~(s.alive[i] & trees.decision[p, i])

    def walk(s: State):
        i = s.cursor
        live = s.alive[i]
        return s.replace(cursor=i + 1, tokens=s.tokens + jnp.where(live, trees.pre[p, i], 0.0),
                         gold=s.gold + (live & trees.gold[p, i]))

    s = jax.lax.while_loop(waiting, walk, state.replace(cursor=jnp.asarray(start, jnp.int32)))
    paused = s.cursor < m
    return s.replace(tokens=s.tokens + jnp.where(paused, trees.pre[p, jnp.minimum(s.cursor, m - 1)], 0.0))


def start(trees: Trees, problem) -> State:
    alive = jnp.zeros(trees.n_branches, bool).at[0].set(True)
    state = State(problem=jnp.asarray(problem, jnp.int32), alive=alive, cursor=jnp.int32(0),
                  tokens=jnp.float32(0.0), gold=jnp.float32(0.0))
    return _advance(trees, state, 0)


def reset(trees: Trees, key) -> State:
    return start(trees, jax.random.randint(key, (), 0, trees.n_problems))


def observe(trees: Trees, state: State) -> jax.Array:
    i = jnp.minimum(state.cursor, trees.n_branches - 1)
    progress = jnp.stack([state.tokens / 1000, state.gold / 10])
    return jnp.concatenate([trees.features[state.problem, i], progress]).astype(jnp.float32)


def step(trees: Trees, price: Price, state: State, action) -> tuple[State, jax.Array, jax.Array]:
    """Apply the decision at the current pause, then walk on to the next one. (state, reward, done)."""
    p, i = state.problem, state.cursor
    children = trees.children[p, i]
    has_children = children[0] >= 0
    keep = (children >= 0) & jnp.where(action == EXPAND, True, jnp.arange(children.shape[0]) == 0)
    keep &= action != PRUNE
    born = jnp.any((jnp.arange(trees.n_branches)[:, None] == children[None, :]) & keep[None, :], axis=1)
    finishes = ~has_children & (action != PRUNE)  # a last-level pause that decodes on to its end
    moved = state.replace(alive=state.alive | born,
                          tokens=state.tokens + jnp.where(finishes, trees.post[p, i], 0.0),
                          gold=state.gold + (finishes & trees.gold[p, i]))
    after = _advance(trees, moved, i + 1)
    reward = (after.gold - state.gold) - price.alpha * (after.tokens - state.tokens) / 1000
    return after, reward, after.cursor >= trees.n_branches


def outcome(trees: Trees, state: State, action, next_state: State) -> dict[str, jax.Array]:
    return {"gold": next_state.gold, "tokens": next_state.tokens}


def replay(trees: Trees, policy) -> dict[str, np.ndarray]:
    """Every problem once under `policy(obs) -> action` (deterministic): gold traces and tokens per problem."""

    def episode(problem):
        def body(state, _):
            over = state.cursor >= trees.n_branches
            nxt, _, _ = step(trees, Price(), state, policy(observe(trees, state)))
            return jax.tree.map(lambda a, b: jnp.where(over, a, b), state, nxt), None

        state, _ = jax.lax.scan(body, start(trees, problem), None, trees.n_branches)
        return {"gold": state.gold, "tokens": state.tokens}

    out = jax.jit(jax.vmap(episode))(jnp.arange(trees.n_problems))
    return {k: np.asarray(v) for k, v in out.items()}


def confidence_pruner(threshold: float):
    """The live search's rule: prune a branch that has written tokens with a mean top probability below
    `threshold`, else expand."""
    def policy(obs):
        judged = obs[FEATURES.index("path tokens / max_new_tokens")] > 0
        return jnp.where(judged & (obs[FEATURES.index("confidence")] < threshold), PRUNE, EXPAND)

    return policy


def constant(action: int):
    return lambda obs: jnp.int32(action)


def complete_search_config(config) -> search_lib.SearchConfig:
    """The recording search: the configured expansion, with pruning and the budget off."""
    sc = teachers_run.search_config(config)
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
    """The complete search tree of each problem, saved as it finishes (a rerun reads them back)."""
    test, fewshot = teachers_run.held_out(config)
    problems = test[: config.pruning.problems]
    trees_dir = workdir / "trees"
    trees_dir.mkdir(exist_ok=True)
    if all((trees_dir / f"{r.uid}.json").exists() for r in problems):
        return problems, [json.loads((trees_dir / f"{r.uid}.json").read_text()) for r in problems]
    stack, _ = teachers_run.load_stack(config, fewshot)
    rule = agg_lib.rule_from_config(config.search.rule, threshold=config.gate_threshold)
    sc = complete_search_config(config)
    found = [teachers_run.search_saved(stack, r, sc, rule, config.top_k, trees_dir / f"{r.uid}.json")
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
        return TeacherStack([one], pivot=one.model, fewshot=teachers_run.held_out(config)[1])

    rows = [teachers_run.best_of_n(alone, [by_uid[f["uid"]] for f in held_out], [f["tokens"] for f in held_out], s,
                                   config.search.baseline_temperature, config.search.max_new_tokens,
                                   workdir / "trees" / f"best-of-n-{teacher['name']}-seed{s}.json")
            for s in range(c.seeds)]
    per_seed = [{"gold": sum(r["gold"] for r in seed_rows), "tokens": sum(r["tokens"] for r in seed_rows),
                 "solved": sum(r["gold"] > 0 for r in seed_rows)} for seed_rows in rows]
    return {"teacher": teacher["name"], "temperature": config.search.baseline_temperature, "seeds": per_seed}


def _run(config, workdir: Path) -> dict:
    begin = time.perf_counter()
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
    train_fn = ppo.make_train(ppo_config, train, Price(), dynamics=sys.modules[__name__])
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
              "never_paused": unpaused,
              "learned": learned, "heuristic": heuristic, "fixed": fixed, "ppo_seconds": ppo_seconds,
              "record_seconds": sum(f["seconds"] for f in found), "features": list(FEATURES),
              "history": {k: np.asarray(v).tolist() for k, v in history.items() if k.startswith("episode_")}}
    result["best_of_n"] = baseline
    result["equal_tokens"] = equal_token_comparison(learned, heuristic, c.seeds)
    result["tuned_heuristic"] = tuned
    plot(result, workdir / "pruning.png")
    summary = format_summary(result, config, time.perf_counter() - begin)
    runs.atomic_write_text(workdir / "results.json", json.dumps(result, indent=1))
    runs.atomic_write_text(workdir / "summary.md", summary)
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
                     "gold_std": float(np.std([r["gold"] for r in runs_])),
                     "heuristic_gold": float(np.mean([heuristic_gold_at(heuristic, r["tokens"]) for r in runs_])),
                     "gain": float(np.mean(gains)), "gain_std": float(np.std(gains)), "seeds": len(runs_)})
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
    ax.errorbar([np.mean([r["tokens"] for r in b["seeds"]])], [np.mean(gold)], yerr=[np.std(gold)], fmt="D",
                color="tab:red", label=f"best-of-N from {b['teacher']} (mean ± std over seeds)")
    ax.set_xlabel(f"generated tokens over {result['test_problems']} held-out problems")
    ax.set_ylabel("gold traces found")
    ax.legend(fontsize=8)
    ax.set_title("learned vs heuristic pruning, replayed on complete search trees")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    lines += ["", "Return on the held-out trees (gold - alpha * tokens / 1000), each method fitted on the training "
              "trees: PPO's weights, the heuristic's threshold (the best one there); mean ± std over seeds:", "",
              "| price alpha | PPO return | PPO gold / tokens | heuristic threshold | heuristic return | "
              "heuristic gold / tokens |", "|---:|---:|---:|---:|---:|---:|"]
    for h in result["tuned_heuristic"]:
        mine = [r for r in result["learned"] if r["alpha"] == h["alpha"]]
        returns = [r["gold"] - h["alpha"] * r["tokens"] / 1000 for r in mine]
        lines.append(f"| {h['alpha']:g} | {np.mean(returns):.1f} ± {np.std(returns):.1f} | "
                     f"{np.mean([r['gold'] for r in mine]):.1f} / {np.mean([r['tokens'] for r in mine]):.0f} | "
                     f"{h['threshold']:.2f} | {h['gold'] - h['alpha'] * h['tokens'] / 1000:.1f} | "
                     f"{h['gold']:.0f} / {h['tokens']:.0f} |")
    lines += ["", f"Total time {seconds:.0f} s. Plot: pruning.png."]
    return "\n".join(lines) + "\n"
