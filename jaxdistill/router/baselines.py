"""Baseline routing policies, evaluated through the same environment as the router.

A policy is `policy(obs, state, key) -> action` (see env.episode). The fixed ones:
each single expert (one call), round-robin (experts 0, 1, 2, ... up to a budget),
self-correction (one expert refining its own answer up to a budget) and uniform random.
The plan-based ones choose, per question, a whole path from the start node ("call these
experts, then STOP"): the kNN router takes the plan with the best mean return on the k
most similar training questions; the oracle takes the best plan of the question itself
(an upper bound no router can beat on the same rewards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.router import env as env_lib
from jaxdistill.router.precompute import num_nodes, path_of


def single_expert(expert: int, n_experts: int):
    return lambda obs, state, key: jnp.where(state.t == 0, expert, n_experts)


def round_robin(n_experts: int, budget: int):
    return lambda obs, state, key: jnp.where(state.t < budget, state.t % n_experts, n_experts)


def self_correction(expert: int, n_experts: int, budget: int):
    return lambda obs, state, key: jnp.where(state.t < budget, expert, n_experts)


def random_policy(n_experts: int):
    return lambda obs, state, key: jax.random.randint(key, (), 0, n_experts + 1)


def all_plans(n_experts: int, t_max: int) -> np.ndarray:
    """[M, T_max] int32: plan m calls the experts on the path to node m, then STOPs."""
    stop = n_experts
    plans = np.full((num_nodes(n_experts, t_max), t_max), stop, np.int32)
    for node in range(plans.shape[0]):
        path = path_of(node, n_experts)
        plans[node, : len(path)] = path
    return plans


def plan_policy(plans: np.ndarray, choice: np.ndarray):
    """Follow plans[choice[question]] (choice: one plan index per question)."""
    table = jnp.asarray(plans)[jnp.asarray(choice)]
    return lambda obs, state, key: table[state.question, jnp.minimum(state.t, table.shape[1] - 1)]


def plan_outcomes(env: env_lib.Env, rewards: env_lib.Rewards) -> dict[str, np.ndarray]:
    """Outcome of every plan on every question: dict of [Q, M] arrays."""
    plans = jnp.asarray(all_plans(env.n_experts, env.t_max))
    key = jax.random.key(0)  # plans are deterministic

    def one(question, plan):
        policy = lambda obs, state, k: plan[jnp.minimum(state.t, plan.shape[0] - 1)]  # noqa: E731
        return env_lib.episode(env, rewards, question, policy, key)

    per_plan = jax.vmap(one, in_axes=(None, 0))
    out = jax.jit(jax.vmap(per_plan, in_axes=(0, None)))(jnp.arange(env.n_questions), plans)
    return {k: np.asarray(v) for k, v in out.items()}


def oracle_choice(test_outcomes: dict[str, np.ndarray]) -> np.ndarray:
    """Per question, the plan with the highest return (ties: the cheaper one)."""
    order = np.lexsort((test_outcomes["flops"], -test_outcomes["return"]), axis=-1)
    return order[:, 0]


def knn_choice(train_emb: np.ndarray, train_returns: np.ndarray, test_emb: np.ndarray, k: int) -> np.ndarray:
    """Per test question, the plan with the best mean return over its k nearest training questions (cosine)."""
    if not 1 <= k <= len(train_emb):
        raise ValueError(f"knn_k must be in [1, {len(train_emb)}] (the training questions), got {k}.")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    similarity = unit(test_emb) @ unit(train_emb).T
    neighbours = np.argsort(-similarity, axis=-1)[:, :k]
    return np.argmax(train_returns[neighbours].mean(axis=1), axis=-1)
