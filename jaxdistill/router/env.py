"""The routing MDP as pure JAX arrays, indexed by (question, node of the path tree).

State s_t = [emb(question), emb(current answer) (zeros before the first call), t / T_max,
cost so far / T_max]. Actions 0..N-1 call an expert, which refines the current answer (a
child node in the tree); action N is STOP. Calls are numbered t = 0, 1, ..., T_max - 1.
For a call at step t producing answer y_t with cost C (the call's FLOPs / cost_scale):

    t = 0:  R = P(y_0) - alpha * C
    t > 0:  R = P(y_t) + beta * (P(y_t) - P(y_{t-1})) - alpha * C

An episode ends only on STOP or after the T_max-th call, never because an answer is good:
the ending must not depend on the reference, which the router does not have at test time.
At the end, the delivered answer (the last one; none, quality 0, before any call) earns
+gamma if its quality reaches p0; ending at T_max below p0 costs -gamma; STOP below p0
costs nothing beyond the calls already paid for. References enter only through P, i.e.
through the rewards used in training and the quality reported in evaluation; observations,
the ending and therefore every action are reference-free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdistill.rl.ppo import Policy
from jaxdistill.router.precompute import Table


@struct.dataclass
class Rewards:
    alpha: float = 0.1  # price of one unit of normalised cost
    beta: float = 0.5  # weight of the improvement over the previous answer
    gamma: float = 1.0  # bonus for reaching p0, penalty for not reaching it
    p0: float = 0.9  # quality threshold


@struct.dataclass
class Env:
    quality: jax.Array  # [Q, M] float32
    cost: jax.Array  # [Q, M] float32: FLOPs / cost_scale of the call that made the node
    flops: jax.Array  # [Q, M] float32: raw FLOPs, for reporting
    question_emb: jax.Array  # [Q, D]
    answer_emb: jax.Array  # [Q, M, D]
    n_experts: int = struct.field(pytree_node=False)
    t_max: int = struct.field(pytree_node=False)

    @property
    def n_actions(self) -> int:
        return self.n_experts + 1

    @property
    def n_questions(self) -> int:
        return self.quality.shape[0]

    @property
    def obs_dim(self) -> int:
        return self.question_emb.shape[-1] * 2 + 2  # + step index and cost so far


@struct.dataclass
class State:
    question: jax.Array  # int32
    node: jax.Array  # int32, 0 = no answer yet
    t: jax.Array  # int32, calls made so far
    spent: jax.Array  # float32, normalised cost of the calls made so far


def cost_scale(table: Table, setting: str | float) -> float:
    """'mean': the mean FLOPs of one call in this table (so a typical call costs 1); or a number."""
    if isinstance(setting, str):
        if setting != "mean":
            raise ValueError(f"cost_scale must be 'mean' or a positive number, got {setting!r}.")
        return float(table.flops[:, 1:].mean())
    if setting <= 0:
        raise ValueError(f"cost_scale must be positive, got {setting}.")
    return float(setting)


def feature_stats(table: Table) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the question and answer embeddings (from the training table)."""
    vectors = np.concatenate([table.question_emb, table.answer_emb[:, 1:].reshape(-1, table.answer_emb.shape[-1])])
    return vectors.mean(axis=0), vectors.std(axis=0) + 1e-6


def make_env(table: Table, scale: float, stats: tuple[np.ndarray, np.ndarray]) -> Env:
    """The environment of a table; embeddings are standardised with the training `stats` (the
    start node's answer embedding stays zero: "no answer yet")."""
    mean, std = stats
    answers = (table.answer_emb - mean) / std
    answers[:, 0] = 0.0
    return Env(quality=jnp.asarray(table.quality, jnp.float32),
               cost=jnp.asarray(table.flops / scale, jnp.float32),
               flops=jnp.asarray(table.flops, jnp.float32),
               question_emb=jnp.asarray((table.question_emb - mean) / std, jnp.float32),
               answer_emb=jnp.asarray(answers, jnp.float32),
               n_experts=table.n_experts, t_max=table.t_max)


def start(question) -> State:
    question = jnp.asarray(question, jnp.int32)
    zero = jnp.zeros_like(question)
    return State(question=question, node=zero, t=zero, spent=jnp.zeros(question.shape, jnp.float32))


def reset(env: Env, key) -> State:
    return start(jax.random.randint(key, (), 0, env.n_questions))


def observe(env: Env, state: State) -> jax.Array:
    progress = jnp.stack([state.t / env.t_max, state.spent / env.t_max]).astype(jnp.float32)
    return jnp.concatenate([env.question_emb[state.question], env.answer_emb[state.question, state.node],
                            progress], axis=-1)


def step(env: Env, rewards: Rewards, state: State, action) -> tuple[State, jax.Array, jax.Array]:
    """One transition: (next state, reward, done). Pure; vmap it over environments."""
    stop = action == env.n_experts
    node = jnp.where(stop, state.node, state.node * env.n_experts + 1 + jnp.minimum(action, env.n_experts - 1))
    cost = jnp.where(stop, 0.0, env.cost[state.question, node])
    quality = env.quality[state.question, node]
    previous = env.quality[state.question, state.node]
    improvement = jnp.where(state.t > 0, rewards.beta * (quality - previous), 0.0)
    call_reward = quality + improvement - rewards.alpha * cost
    last = ~stop & (state.t == env.t_max - 1)
    done = stop | last
    reached = quality >= rewards.p0
    terminal = jnp.where(reached, rewards.gamma, jnp.where(last, -rewards.gamma, 0.0))
    reward = jnp.where(stop, 0.0, call_reward) + jnp.where(done, terminal, 0.0)
    next_state = State(question=state.question, node=node, t=state.t + jnp.where(stop, 0, 1),
                       spent=state.spent + cost)
    return next_state, reward, done


def outcome(env: Env, state: State, action, next_state: State) -> dict[str, jax.Array]:
    """What a transition that ends an episode reports to PPO: the delivered answer's quality, calls made."""
    return {"quality": env.quality[next_state.question, next_state.node], "calls": next_state.t}


def episode(env: Env, rewards: Rewards, question, policy, key) -> dict[str, jax.Array]:
    """Run one episode on a question with `policy(obs, state, key) -> action` (a Policy or any
    function); what it delivered."""

    def body(carry, key):
        state, done, total, spent = carry
        action = policy(observe(env, state), state, key)
        next_state, reward, finished = step(env, rewards, state, action)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(done, b, a), new, old)  # noqa: E731
        spent = spent + jnp.where(done, 0.0, env.flops[state.question, next_state.node] *
                                  (next_state.t > state.t))
        return (keep(next_state, state), done | finished, total + jnp.where(done, 0.0, reward), spent), None

    carry = (start(question), jnp.bool_(False), jnp.float32(0.0), jnp.float32(0.0))
    (state, _, total, spent), _ = jax.lax.scan(body, carry, jax.random.split(key, env.t_max))
    return {"quality": env.quality[state.question, state.node], "calls": state.t, "flops": spent,
            "cost": state.spent, "return": total, "node": state.node}


def evaluate(env: Env, rewards: Rewards, policy: Policy, key) -> dict[str, np.ndarray]:
    """Every question once, in parallel: per-question quality, calls, FLOPs, normalised cost, return and
    final node (which names the path: precompute.path_of)."""
    out = _evaluate(env, rewards, policy, jax.random.split(key, env.n_questions))
    return {k: np.asarray(v) for k, v in out.items()}


@jax.jit
def _evaluate(env: Env, rewards: Rewards, policy: Policy, keys) -> dict[str, jax.Array]:
    return jax.vmap(lambda q, k: episode(env, rewards, q, policy, k))(jnp.arange(env.n_questions), keys)
