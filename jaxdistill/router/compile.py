"""The program a `route` job runs on an accelerator, at its config's sizes, for an ahead-of-time compile.

`programs(config, target)` yields `ppo_train`: every (alpha, seed) PPO run of `train_policies`
in one jitted call (`ppo.train_grid`), the seeds split over the target's devices, on an
abstract environment of the config's size: data.train_size questions, every path of up to
precompute.t_max expert calls, embeddings as wide as the encoder's hidden states. Expert
calls (the precompute) are the sampler's programs, which `train` configs compile.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import aot
from jaxdistill import mesh as mesh_lib
from jaxdistill.models.loading import model_config
from jaxdistill.rl import ppo
from jaxdistill.router import env as env_lib
from jaxdistill.router.precompute import num_nodes


def programs(config, target: aot.Target):
    seeds, alphas = config.seeds, len(config.alphas)
    devices = target.devices[: math.gcd(seeds, len(target.devices))]  # each device trains whole seeds
    mesh = mesh_lib.make_mesh({"data": len(devices)}, devices=devices)
    whole = NamedSharding(mesh, PartitionSpec())
    n, q = len(config.experts), config.data.train_size
    nodes, width = num_nodes(n, config.precompute.t_max), model_config(config.encoder).d_model
    table = lambda *shape: aot.abstract(shape, jnp.float32, whole)  # noqa: E731
    env = env_lib.Env(quality=table(q, nodes), cost=table(q, nodes), flops=table(q, nodes),
                      question_emb=table(q, width), answer_emb=table(q, nodes, width), n_experts=n,
                      t_max=config.precompute.t_max)
    e = config.env
    train = ppo.make_train(ppo.PPOConfig.from_config(config.ppo), env,
                           env_lib.Rewards(alpha=e.alpha, beta=e.beta, gamma=e.gamma, p0=e.p0), env_lib)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), seeds))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=mesh_lib.batch_sharding(mesh, 1))
    alpha_values = aot.abstract((alphas,), jnp.float32, whole)
    yield aot.Program("ppo_train", ppo.grid_program(train, mesh), (keys, alpha_values, env))
