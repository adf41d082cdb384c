"""Environment steps per second: our jitted PPO against Stable-Baselines3 PPO (PyTorch).

Both train on the same precomputed routing environment with the same hyper-parameters
(64 environments x 16 steps per update, 4 epochs of 4 minibatches, tanh MLPs 128x128 for
policy and value, Adam 3e-4 annealed, clip 0.2, GAE 0.99/0.95). SB3 steps a gymnasium
version of the environment (NumPy, checked against the JAX one before timing) through a
DummyVecEnv, as a user would write it.

    python benchmarks/ppo.py                                     # a random table of the default's shape
    python benchmarks/ppo.py --table runs/router/default/precompute/table.npz
    python benchmarks/ppo.py --dim 16      # small observations: SB3's Python overhead dominates
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import printout

from jaxdistill.rl import ppo
from jaxdistill.router import env as env_lib
from jaxdistill.router.precompute import Table, num_nodes


class RoutingGym(gym.Env):
    """The routing MDP in NumPy, with the same reward rules as jaxdistill.router.env."""

    def __init__(self, env: env_lib.Env, rewards: env_lib.Rewards, seed: int):
        self.quality, self.cost = np.asarray(env.quality), np.asarray(env.cost)
        self.qe, self.ae = np.asarray(env.question_emb), np.asarray(env.answer_emb)
        self.n, self.t_max, self.r = env.n_experts, env.t_max, rewards
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (env.obs_dim,), np.float32)
        self.action_space = gym.spaces.Discrete(self.n + 1)
        self.rng = np.random.default_rng(seed)

    def _obs(self):
        progress = np.array([self.t / self.t_max, self.spent / self.t_max], np.float32)
        return np.concatenate([self.qe[self.q], self.ae[self.q, self.node], progress])

    def reset(self, *, seed=None, options=None):
        self.q, self.node, self.t, self.spent = int(self.rng.integers(len(self.quality))), 0, 0, 0.0
        return self._obs(), {}

    def step(self, action):
        r = self.r
        if action == self.n:  # STOP: +gamma if the delivered answer reached p0, nothing otherwise
            return self._obs(), (r.gamma if self.quality[self.q, self.node] >= r.p0 else 0.0), True, False, {}
        new = self.node * self.n + 1 + int(action)
        quality, previous = self.quality[self.q, new], self.quality[self.q, self.node]
        reward = quality - r.alpha * self.cost[self.q, new] + (r.beta * (quality - previous) if self.t else 0.0)
        last = self.t == self.t_max - 1
        if last:
            reward += r.gamma if quality >= r.p0 else -r.gamma
        self.node, self.t, self.spent = new, self.t + 1, self.spent + self.cost[self.q, new]
        return self._obs(), float(reward), bool(last), False, {}


def random_table(questions=128, n=3, t_max=2, dim=576, seed=0) -> Table:
    rng = np.random.default_rng(seed)
    m = num_nodes(n, t_max)
    quality = rng.uniform(size=(questions, m)).astype(np.float32)
    flops = rng.uniform(1e10, 8e10, size=(questions, m))
    quality[:, 0], flops[:, 0] = 0, 0
    return Table(quality, flops, rng.normal(size=(questions, dim)).astype(np.float32),
                 rng.normal(size=(questions, m, dim)).astype(np.float32), [[""] * m] * questions,
                 [str(i) for i in range(questions)], [""] * questions, [f"e{i}" for i in range(n)], t_max)


def check_same_rewards(env, rewards, steps=2000):
    """The gym env and the JAX env give the same rewards on the same random episodes."""
    gym_env = RoutingGym(env, rewards, seed=0)
    rng = np.random.default_rng(1)
    gym_env.reset()
    state = env_lib.start(gym_env.q)
    step = jax.jit(lambda s, a: env_lib.step(env, rewards, s, a))
    for _ in range(steps):
        action = int(rng.integers(env.n_actions))
        _, reward, done, _, _ = gym_env.step(action)
        state, jax_reward, jax_done = step(state, action)
        assert abs(reward - float(jax_reward)) < 1e-4 and done == bool(jax_done), (reward, float(jax_reward))
        if done:
            gym_env.reset()
            state = env_lib.start(gym_env.q)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help="a precomputed table.npz (default: random, the default run's shape)")
    parser.add_argument("--dim", type=int, default=576, help="embedding size of the random table")
    parser.add_argument("--sb3-steps", type=int, default=32_768)
    parser.add_argument("--jax-steps", type=int, default=1_048_576)
    parser.add_argument("--seeds", type=int, default=8, help="policies trained at once with vmap (second row)")
    args = parser.parse_args()

    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    table = Table.load(args.table) if args.table else random_table(dim=args.dim)
    env = env_lib.make_env(table, env_lib.cost_scale(table, "mean"), env_lib.feature_stats(table))
    rewards = env_lib.Rewards()
    check_same_rewards(env, rewards)
    base = ppo.PPOConfig(total_timesteps=args.jax_steps)
    print(f"environment: {env.n_questions} questions, {env.n_experts} experts, T_max {env.t_max}, "
          f"observation {env.obs_dim}; rewards of the gym and JAX versions agree on 2000 random steps")
    print(f"machine: {jax.devices()[0].device_kind}, {torch.get_num_threads()} torch threads")

    vec = DummyVecEnv([lambda s=s: RoutingGym(env, rewards, seed=s) for s in range(base.num_envs)])
    model = PPO("MlpPolicy", vec, n_steps=base.num_steps, batch_size=base.num_envs * base.num_steps //
                base.num_minibatches, n_epochs=base.update_epochs, gamma=base.discount, gae_lambda=base.gae_lambda,
                clip_range=base.clip_eps, ent_coef=base.ent_coef, vf_coef=base.vf_coef,
                max_grad_norm=base.max_grad_norm, learning_rate=lambda remaining: base.lr * remaining,
                policy_kwargs=dict(net_arch=dict(pi=list(base.hidden), vf=list(base.hidden)),
                                   activation_fn=torch.nn.Tanh), device="cpu", seed=0, verbose=0)
    start = time.perf_counter()
    model.learn(total_timesteps=args.sb3_steps)
    sb3_rate = args.sb3_steps / (time.perf_counter() - start)

    rows = [("Stable-Baselines3 PPO (PyTorch)", sb3_rate, sb3_rate)]
    for seeds in (1, args.seeds):
        train = jax.jit(jax.vmap(ppo.make_train(base, env, rewards, env_lib), in_axes=(0, None, None)))
        keys = jax.random.split(jax.random.key(0), seeds)
        start = time.perf_counter()
        jax.block_until_ready(train(keys, jnp.float32(rewards.alpha), env))
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(train(jax.random.split(jax.random.key(1), seeds), jnp.float32(rewards.alpha), env))
        steady = time.perf_counter() - start
        steps = base.num_updates * base.num_envs * base.num_steps * seeds
        rows.append((f"jaxdistill PPO, {seeds} polic{'y' if seeds == 1 else 'ies'} (vmap)", steps / steady,
                     steps / first))

    print("\n| implementation | env steps/s | with compile | ratio to SB3 |\n|---|---:|---:|---:|")
    for name, rate, with_compile in rows:
        print(f"| {name} | {rate:,.0f} | {with_compile:,.0f} | {rate / sb3_rate:.1f}x |")


if __name__ == "__main__":
    printout.run(main)
