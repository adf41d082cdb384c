"""The programs a self-distillation job runs, at its config's shapes, for an ahead-of-time compile.

`programs(config, target)` yields (see `jaxdistill.aot`):
- `train_step`: the jitted update with its optimizer, on the training batch
  (batch_size x samples_per_problem problems, two rows each for the distillation arms);
- `rollout_prefill` and `rollout_decode`: the sampler at the rollout batch, prompt width and
  sample.max_new_tokens (guided sampling decodes both contexts);
- `eval_prefill`, `eval_decode`: greedy held-out decoding at eval.batch_size and
  eval.max_new_tokens; `eval_score`: the held-out scoring forward over both contexts.

Prompt lengths come from data at run time; the compile assumes `compile.prompt_tokens` (the
longest prompt with its hint). No weights are read: `config.model` may be a shape name
(`qwen3-8b`) or a directory holding only config.json.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdistill import aot, sampling
from jaxdistill import mesh as mesh_lib
from jaxdistill.distill import evaluate
from jaxdistill.distill import step as step_lib
from jaxdistill.distill.config import trainer, validate
from jaxdistill.distill.rollouts import GuidedRule
from jaxdistill.models.loading import DTYPES, model_config
from jaxdistill.models.transformer import Decoder


def abstract_model(config, mesh) -> Decoder:
    """The config's model with abstract parameters placed in their shardings on `mesh`."""
    dtype = DTYPES[config.dtype]
    model = nnx.eval_shape(lambda: Decoder(model_config(config.model), rngs=nnx.Rngs(0), param_dtype=dtype,
                                           compute_dtype=DTYPES[config.compute_dtype or config.dtype],
                                           remat=config.remat, attention=config.get("attention", "xla"), mesh=mesh))
    return mesh_lib.shard_model(model, mesh)


def split_rows(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    """An abstract batch array, its rows split over the mesh's batch axes as the job places them."""
    return aot.abstract(shape, dtype, mesh_lib.batch_sharding(mesh, len(shape)))


def train_batch(config, mesh, prompt: int, gen: int) -> dict:
    """The abstract training batch of `config.arm` (see `step.build_batch`)."""
    problems = config.batch_size * config.get("samples_per_problem", 1)
    mode = step_lib.mode_for(config.arm)
    rows = problems * (2 if mode == "distill" else 1)
    width = step_lib.round_up(prompt, 32) + gen
    on_rows = functools.partial(split_rows, mesh)
    batch = {"tokens": on_rows((rows, width), jnp.int32), "mask": on_rows((rows, width), bool),
             "target_mask": on_rows((problems, gen), bool), "end_mask": on_rows((problems, gen), bool)}
    if mode == "sparse":
        k = config.stack.record_top
        batch |= {"target_ids": on_rows((problems, gen, k), jnp.int32),
                  "target_logprobs": on_rows((problems, gen, k), jnp.float32)}
    if config.get("sft_weight", 0.0):
        batch["sft"] = {"tokens": on_rows((problems, width), jnp.int32), "mask": on_rows((problems, width), bool),
                        "target_mask": on_rows((problems, gen), bool), "end_mask": on_rows((problems, gen), bool)}
    return batch


def sampler_programs(prefix: str, model: Decoder, mesh, rows: int, prompt: int, new_tokens: int, rule):
    """Prefill and decode of `sampling.generate` for `rows` prompts of `prompt` tokens."""
    graphdef, params = nnx.split(model)
    ways = mesh_lib.batch_rows_per_process(mesh) * jax.process_count()
    rows = -(-sampling.bucket(rows, minimum=1) // ways) * ways
    width, slots = sampling.bucket(prompt), sampling.bucket(new_tokens)
    on_rows = functools.partial(split_rows, mesh)
    tokens, mask = on_rows((rows, width), jnp.int32), on_rows((rows, width), bool)
    prefill = aot.Program(f"{prefix}_prefill", sampling._prefill_jit, (graphdef, params, tokens, mask, None),
                          dict(new_slots=slots, pad_id=0, mesh=mesh))
    decoding, outputs = aot.outputs_of(prefill, (yield prefill))
    key = jax.eval_shape(lambda: jax.random.key(0))
    yield aot.Program(f"{prefix}_decode", sampling._decode_jit,
                      (graphdef, params, decoding, outputs, key, aot.abstract((), jnp.int32)),
                      dict(rule=rule, eos_ids=(0,), pad_id=0))


def programs(config, target: aot.Target):

    validate(config)
    mesh = mesh_lib.make_mesh(dict(config.mesh), devices=target.devices)
    prompt = config.compile.prompt_tokens
    gen = step_lib.round_up(config.sample.max_new_tokens, 32)
    model = abstract_model(config, mesh)
    graphdef, state, train_step = trainer(config, model, mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    yield aot.Program("train_step", train_step, (state, train_batch(config, mesh, prompt, gen), key))

    model = step_lib.as_model(graphdef, step_lib.all_params(state))
    problems = config.batch_size * config.get("samples_per_problem", 1)
    s = config.sample
    if config.arm != "sft":
        rule = (GuidedRule(config.teacher_weight, s.temperature) if config.guided
                else sampling.Sample(s.temperature, s.top_k, s.top_p))
        yield from sampler_programs("rollout", model, mesh, problems * (2 if config.guided else 1), prompt,
                                    s.max_new_tokens, rule)
    e = config.eval
    yield from sampler_programs("eval", model, mesh, e.batch_size, prompt, e.max_new_tokens, sampling.Greedy())
    rows = -(-e.batch_size // mesh_lib.batch_rows_per_process(mesh)) * mesh_lib.batch_rows_per_process(mesh)
    width = step_lib.round_up(prompt, 32) + step_lib.round_up(e.max_new_tokens, 32)
    on_rows = functools.partial(split_rows, mesh)
    scored = (on_rows((2 * rows, width), jnp.int32), on_rows((2 * rows, width), bool),
              on_rows((rows, step_lib.round_up(e.max_new_tokens, 32)), bool))
    yield aot.Program("eval_score", evaluate.score_program, (*nnx.split(model), *scored))
