"""Baseline routing policies, evaluated through the same environment as the router.

A policy is `policy(obs, state, key) -> action` (see env.episode), built as a ppo.Policy so
that policies of one kind share a compiled evaluation. The fixed ones: each single expert
(one call), round-robin (the experts in a given order, cycling, up to a budget),
self-correction (one expert refining its own answer up to a budget) and random (STOP with a
set probability, otherwise a uniformly drawn expert). The plan-based ones choose, per
question, a whole path from the start node ("call these experts, then STOP"), by quality at a
price per unit of cost (quality - price * cost), not by the shaped return: the kNN router
from the k most similar training questions, the oracle from the question's own outcomes (an
upper bound that reads the test references; no router can do better).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.rl.ppo import Policy
from jaxdistill.router import env as env_lib
from jaxdistill.router.precompute import num_nodes, path_of


def single_expert(expert: int, n_experts: int) -> Policy:
    return fixed_calls([expert], n_experts)


def round_robin(order, n_experts: int, budget: int) -> Policy:
    """Call order[0], order[1], ... (cycling) for `budget` calls, then STOP."""
    order = [int(e) for e in order]
    return fixed_calls([order[t % len(order)] for t in range(budget)], n_experts)


def self_correction(expert: int, n_experts: int, budget: int) -> Policy:
    return fixed_calls([expert] * budget, n_experts)


def fixed_calls(calls, n_experts: int) -> Policy:
    """Call these experts in this order, then STOP."""
    return Policy(args=jnp.asarray([*calls, n_experts], jnp.int32), act=_follow_plan)


def _follow_plan(_, plan, obs, state, key):
    return plan[jnp.minimum(state.t, plan.shape[0] - 1)]


def random_policy(n_experts: int, stop_probability: float | None = None) -> Policy:
    """STOP with `stop_probability` (None: 1/(N+1), uniform over all actions), else a uniform expert."""
    p = 1.0 / (n_experts + 1) if stop_probability is None else stop_probability
    return Policy(args=jnp.float32(p), act=_stop_or_random_expert, static=n_experts)


def _stop_or_random_expert(n_experts, stop_probability, obs, state, key):
    stop_key, expert_key = jax.random.split(key)
    expert = jax.random.randint(expert_key, (), 0, n_experts)
    return jnp.where(jax.random.uniform(stop_key) < stop_probability, n_experts, expert)


def stop_probability_for(mean_calls: float, t_max: int) -> float:
    """The per-step STOP probability p whose expected number of calls, sum_{t=1..T} (1-p)^t, is mean_calls."""
    if not 0 <= mean_calls <= t_max:
        raise ValueError(f"mean_calls must be in [0, {t_max}], got {mean_calls}.")
    expected = lambda p: sum((1 - p) ** t for t in range(1, t_max + 1))  # noqa: E731  (decreasing in p)
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) > mean_calls else (low, mid)
    return (low + high) / 2


def all_plans(n_experts: int, t_max: int) -> np.ndarray:
    """[M, T_max] int32: plan m calls the experts on the path to node m, then STOPs."""
    stop = n_experts
    plans = np.full((num_nodes(n_experts, t_max), t_max), stop, np.int32)
    for node in range(plans.shape[0]):
        path = path_of(node, n_experts)
        plans[node, : len(path)] = path
    return plans


def plan_policy(plans: np.ndarray, choice: np.ndarray) -> Policy:
    """Follow plans[choice[question]] (choice: one plan index per question)."""
    return Policy(args=jnp.asarray(plans)[jnp.asarray(choice)], act=_follow_question_plan)


def _follow_question_plan(_, table, obs, state, key):
    return table[state.question, jnp.minimum(state.t, table.shape[1] - 1)]


def plan_outcomes(env: env_lib.Env, rewards: env_lib.Rewards) -> dict[str, np.ndarray]:
    """Outcome of every plan on every question: dict of [Q, M] arrays."""
    out = _plan_outcomes(env, rewards, jnp.asarray(all_plans(env.n_experts, env.t_max)))
    return {k: np.asarray(v) for k, v in out.items()}


@jax.jit
def _plan_outcomes(env: env_lib.Env, rewards: env_lib.Rewards, plans) -> dict[str, jax.Array]:
    key = jax.random.key(0)  # plans are deterministic
    one = lambda question, plan: env_lib.episode(env, rewards, question, Policy(plan, _follow_plan), key)  # noqa: E731
    per_plan = jax.vmap(one, in_axes=(None, 0))
    return jax.vmap(per_plan, in_axes=(0, None))(jnp.arange(env.n_questions), plans)


def best_plan(quality: np.ndarray, cost: np.ndarray, price: float) -> np.ndarray:
    """Per row, the plan with the highest quality - price * cost (ties: the cheaper one)."""
    order = np.lexsort((cost, -(quality - price * cost)), axis=-1)
    return order[..., 0]


def oracle_choice(test_outcomes: dict[str, np.ndarray], price: float) -> np.ndarray:
    """Per test question, its own best plan at this price (reads the test references)."""
    return best_plan(test_outcomes["quality"], test_outcomes["cost"], price)


def knn_choice(train_emb: np.ndarray, train_outcomes: dict[str, np.ndarray], test_emb: np.ndarray, k: int,
               price: float) -> np.ndarray:
    """Per test question, the plan with the best mean quality - price * cost over its k nearest
    training questions (cosine similarity of the question embeddings)."""
    if not 1 <= k <= len(train_emb):
        raise ValueError(f"knn_k must be in [1, {len(train_emb)}] (the training questions), got {k}.")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    similarity = unit(test_emb) @ unit(train_emb).T
    neighbours = np.argsort(-similarity, axis=-1, kind="stable")[:, :k]
    quality, cost = train_outcomes["quality"][neighbours].mean(axis=1), train_outcomes["cost"][neighbours].mean(axis=1)
    return best_plan(quality, cost, price)
