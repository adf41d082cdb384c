"""PPO, PureJaxRL-style: a whole training run is one jitted function of a key. The router
and the branch-search pruner both train with it.

`make_train(config, env, rewards, dynamics)` returns `train(key, alpha, env) -> (PolicyState,
metrics)`:
a scan over updates, each collecting `num_steps` transitions from `num_envs` vectorised
environments (auto-reset), computing GAE, and running `update_epochs` epochs of
`num_minibatches` minibatches of the clipped-surrogate + value + entropy loss with optax.
The environment is an argument (the one given to make_train fixes only its shapes), so the
same program runs on other data, or compiles ahead of time from abstract arrays.
`train_grid` runs it for every (alpha, seed) in one call, the seeds split over a mesh's devices.
`Policy` holds a policy's arrays apart from its function, so that evaluating many policies of
one kind (trained ones, baselines) compiles once.

`dynamics` is the environment's module of pure functions: `reset(env, key)`, `observe(env,
state)`, `step(env, rewards, state, action)` and `outcome(env, state, action, next_state)`
(what a finished episode reports): `router/env.py`, `teachers/pruning_env.py`. `env` has
`obs_dim` and `n_actions`; `rewards` has an `alpha` field, the cost price.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    num_envs: int = 64
    num_steps: int = 16  # per environment per update
    total_timesteps: int = 200_000
    update_epochs: int = 4
    num_minibatches: int = 4
    discount: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    lr: float = 3e-4
    anneal_lr: bool = True
    hidden: tuple[int, ...] = (128, 128)

    def __post_init__(self):
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps ({self.total_timesteps}) is below one update "
                             f"(num_envs * num_steps = {self.num_envs * self.num_steps}).")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps ({self.num_envs * self.num_steps}) must divide into "
                             f"num_minibatches ({self.num_minibatches}).")

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.num_steps)

    @classmethod
    def from_config(cls, c) -> PPOConfig:
        values = dict(c)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)


class ActorCritic(nnx.Module):
    """Separate tanh MLPs for the policy (softmax over actions) and the value."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...], *, rngs: nnx.Rngs):
        def mlp(out: int, last_scale: float):
            sizes = (obs_dim, *hidden)
            layers = [nnx.Linear(a, b, kernel_init=nnx.initializers.orthogonal(np.sqrt(2)), rngs=rngs)
                      for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
            return nnx.List(layers), nnx.Linear(sizes[-1], out, kernel_init=nnx.initializers.orthogonal(last_scale),
                                                rngs=rngs)

        self.actor_hidden, self.actor_out = mlp(n_actions, 0.01)
        self.critic_hidden, self.critic_out = mlp(1, 1.0)

    def __call__(self, obs):
        a, v = obs, obs
        for layer in self.actor_hidden:
            a = jnp.tanh(layer(a))
        for layer in self.critic_hidden:
            v = jnp.tanh(layer(v))
        return self.actor_out(a), self.critic_out(v)[..., 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyState:
    """What a PPO run trains: the policy/value parameters and their optimizer state."""

    params: nnx.State
    opt_state: optax.OptState


def policy_graph(env, config: PPOConfig) -> nnx.GraphDef:
    return nnx.split(ActorCritic(env.obs_dim, env.n_actions, config.hidden, rngs=nnx.Rngs(0)))[0]


def init_params(env, config: PPOConfig, key) -> nnx.State:
    return nnx.split(ActorCritic(env.obs_dim, env.n_actions, config.hidden, rngs=nnx.Rngs(key)))[1]


def apply(graphdef, params, obs):
    return nnx.merge(graphdef, params)(obs)


def gae(rewards, values, dones, last_value, discount: float, lam: float):
    """Generalized advantage estimates and value targets; arrays are [T, ...] in time order.

    dones[t] marks that the episode ended at step t, so step t does not bootstrap from t+1.
    """

    def backward(carry, x):
        advantage, next_value = carry
        reward, value, done = x
        delta = reward + discount * next_value * (1 - done) - value
        advantage = delta + discount * lam * (1 - done) * advantage
        return (advantage, value), advantage

    _, advantages = jax.lax.scan(backward, (jnp.zeros_like(last_value), last_value),
                                 (rewards, values, dones.astype(rewards.dtype)), reverse=True)
    return advantages, advantages + values


def make_train(config: PPOConfig, env, rewards, dynamics):
    """train(key, alpha, env) -> (PolicyState, per-update metrics); jit/vmap it, or use train_grid.
    `env` here fixes the policy's input and output sizes."""
    graphdef = policy_graph(env, config)
    batch = config.num_envs * config.num_steps
    minibatch = batch // config.num_minibatches
    steps_per_run = config.num_updates * config.update_epochs * config.num_minibatches
    lr = optax.linear_schedule(config.lr, 0.0, steps_per_run) if config.anneal_lr else config.lr
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(lr, eps=1e-5))
    step_all = jax.vmap(dynamics.step, in_axes=(None, None, 0, 0))
    observe_all = jax.vmap(dynamics.observe, in_axes=(None, 0))
    reset_all = jax.vmap(dynamics.reset, in_axes=(None, 0))
    outcome_all = jax.vmap(dynamics.outcome, in_axes=(None, 0, 0, 0))

    def loss_fn(params, mb):
        logits, value = apply(graphdef, params, mb["obs"])
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, mb["action"][:, None], axis=-1)[:, 0]
        ratio = jnp.exp(logp - mb["logp"])
        adv = (mb["advantage"] - mb["advantage"].mean()) / (mb["advantage"].std() + 1e-8)
        policy_loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * adv).mean()
        clipped_value = mb["value"] + jnp.clip(value - mb["value"], -config.clip_eps, config.clip_eps)
        value_loss = 0.5 * jnp.maximum((value - mb["target"]) ** 2, (clipped_value - mb["target"]) ** 2).mean()
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
        total = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        return total, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy}

    def train(key, alpha, env):
        r = rewards.replace(alpha=alpha)
        key, init_key, reset_key = jax.random.split(key, 3)
        params = init_params(env, config, init_key)
        opt_state = tx.init(params)
        states = reset_all(env, jax.random.split(reset_key, config.num_envs))
        running = jnp.zeros(config.num_envs)

        def env_step(carry, _):
            params, states, running, key = carry
            key, act_key, reset_key = jax.random.split(key, 3)
            obs = observe_all(env, states)
            logits, value = apply(graphdef, params, obs)
            action = jax.random.categorical(act_key, logits)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
            next_states, reward, done = step_all(env, r, states, action)
            fresh = reset_all(env, jax.random.split(reset_key, config.num_envs))
            outcome = outcome_all(env, states, action, next_states)
            next_states = jax.tree.map(lambda f, n: jnp.where(done.reshape(-1, *[1] * (f.ndim - 1)), f, n),
                                       fresh, next_states)
            running = running + reward
            finished = {"return": jnp.where(done, running, 0.0), "done": done}
            finished |= {k: jnp.where(done, v, 0) for k, v in outcome.items()}
            transition = {"obs": obs, "action": action, "logp": logp, "value": value, "reward": reward,
                          "done": done}
            return (params, next_states, jnp.where(done, 0.0, running), key), (transition, finished)

        def update(carry, _):
            params, opt_state, states, running, key = carry
            (params, states, running, key), (traj, finished) = jax.lax.scan(
                env_step, (params, states, running, key), None, config.num_steps)
            _, last_value = apply(graphdef, params, observe_all(env, states))
            advantage, target = gae(traj["reward"], traj["value"], traj["done"], last_value,
                                    config.discount, config.gae_lambda)
            data = {**{k: traj[k].reshape(batch, *traj[k].shape[2:]) for k in ("obs", "action", "logp", "value")},
                    "advantage": advantage.reshape(batch), "target": target.reshape(batch)}

            def epoch(carry, key):
                order = jax.random.permutation(key, batch)
                shuffled = jax.tree.map(lambda x: x[order].reshape(config.num_minibatches, minibatch,
                                                                   *x.shape[1:]), data)

                def minibatch_step(carry, mb):
                    params, opt_state = carry
                    grads, stats = jax.grad(loss_fn, has_aux=True)(params, mb)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), stats

                return jax.lax.scan(minibatch_step, carry, shuffled)

            key, epoch_key = jax.random.split(key)
            (params, opt_state), stats = jax.lax.scan(epoch, (params, opt_state),
                                                      jax.random.split(epoch_key, config.update_epochs))
            episodes = jnp.maximum(finished["done"].sum(), 1)
            metrics = {k: v.mean() for k, v in stats.items()}
            metrics |= {f"episode_{k}": finished[k].sum() / episodes for k in finished if k != "done"}
            metrics["episodes"] = finished["done"].sum()
            return (params, opt_state, states, running, key), metrics

        (params, opt_state, *_), metrics = jax.lax.scan(update, (params, opt_state, states, running, key), None,
                                                        config.num_updates)
        return PolicyState(params, opt_state), metrics

    return train


def train_grid(train, env, keys, alphas, mesh=None):
    """Every (alpha, seed) run in one jitted call: states and metrics [alphas, seeds, ...].

    With a mesh, the seeds are split over its batch axes (data x fsdp): each device trains its
    own policies and holds only their parameters, moments and rollout buffers. `env` is
    replicated (every run reads all of it)."""
    return grid_program(train, mesh)(keys, alphas, env)


def grid_program(train, mesh=None):
    """`train` vmapped over seeds and alphas and jitted, the seeds (and everything they train)
    split over the mesh's batch axes; called as (keys [S], alphas [A], env)."""
    run = jax.vmap(jax.vmap(train, in_axes=(0, None, None)), in_axes=(None, 0, None))
    if mesh is None:
        return jax.jit(run)
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdistill import mesh as mesh_lib

    seeds = mesh_lib.batch_sharding(mesh, 1)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(run, in_shardings=(seeds, replicated, replicated),
                   out_shardings=NamedSharding(mesh, PartitionSpec(None, seeds.spec[0])))


def select(params, *index):
    """One policy out of a stack trained with vmap, e.g. select(params, alpha_index, seed)."""
    return jax.tree.map(lambda x: x[index], params)


@struct.dataclass
class Policy:
    """`act(static, args, *inputs) -> action`, with the policy's arrays (`args`) apart from its
    function and hashable settings (`static`), so that one compiled evaluation serves every
    policy of a kind: a fresh closure per policy would compile the evaluation again."""
    args: Any
    act: Callable = struct.field(pytree_node=False)
    static: Hashable = struct.field(pytree_node=False, default=None)

    def __call__(self, *inputs) -> jax.Array:
        return self.act(self.static, self.args, *inputs)


def greedy_policy(graphdef, params) -> Policy:
    """The trained policy: the most likely action, `policy(obs, ...)`."""
    return Policy(args=params, act=_most_likely_action, static=graphdef)


def _most_likely_action(graphdef, params, obs, *_):
    return jnp.argmax(apply(graphdef, params, obs)[0], axis=-1)
