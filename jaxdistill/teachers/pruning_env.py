"""The branch search as a decision process for PPO: each problem's complete search tree (recorded
once, unpruned) replayed exactly in JAX. At each pause the policy sees the stack's features and
expands, continues on the consensus token, or prunes; it earns the gold traces it leads to minus
a price per 1,000 tokens. Any pruning policy's search is a subtree of the complete one, so the
replay is that policy's search. `reset`, `observe`, `step` and `outcome` are the dynamics
`rl.ppo` trains with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdistill.errors import ConfigError
from jaxdistill.teachers import search as search_lib

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
        return self.features.shape[-1] + 1  # + tokens spent so far

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
    """The pause's features and the tokens spent so far. Never the gold found so far: that comes from
    checking leaves against the reference, which a search on a new problem does not have."""
    i = jnp.minimum(state.cursor, trees.n_branches - 1)
    return jnp.concatenate([trees.features[state.problem, i], (state.tokens / 1000)[None]]).astype(jnp.float32)


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
    """Every problem once under `policy(obs) -> action` (deterministic): gold traces and tokens per problem,
    and the decisions [problems, branches] in the order they were made (-1 once the search is over)."""

    def episode(problem):
        def body(state, _):
            over = state.cursor >= trees.n_branches
            action = policy(observe(trees, state))
            nxt, _, _ = step(trees, Price(), state, action)
            return jax.tree.map(lambda a, b: jnp.where(over, a, b), state, nxt), jnp.where(over, -1, action)

        state, actions = jax.lax.scan(body, start(trees, problem), None, trees.n_branches)
        return {"gold": state.gold, "tokens": state.tokens, "actions": actions, "alive": state.alive}

    out = jax.jit(jax.vmap(episode))(jnp.arange(trees.n_problems))
    return {k: np.asarray(v) for k, v in out.items()}


def leaves_reached(trees: Trees, replayed: dict) -> np.ndarray:
    """[P, M] bool: the leaves a replay decoded to their end: live branches without children, unless their
    own pause was pruned (decisions come in branch order over the live pausing branches)."""
    alive, decision = replayed["alive"], np.asarray(trees.decision)
    reached = alive & (np.asarray(trees.children)[..., 0] < 0)
    for p in range(alive.shape[0]):
        deciding = np.flatnonzero(alive[p] & decision[p])
        reached[p, deciding] &= replayed["actions"][p, : len(deciding)] != PRUNE
    return reached


def confidence_pruner(threshold: float):
    """The live search's rule: prune a branch that has written tokens with a mean top probability below
    `threshold`, else expand."""
    def policy(obs):
        judged = obs[FEATURES.index("path tokens / max_new_tokens")] > 0
        return jnp.where(judged & (obs[FEATURES.index("confidence")] < threshold), PRUNE, EXPAND)

    return policy


def constant(action: int):
    return lambda obs: jnp.int32(action)
