"""The programs a `teachers` job runs, at its config's sizes, for an ahead-of-time compile.

`programs(config, target)` yields `lockstep_start` (every teacher's prefill) and
`lockstep_advance` (the decode loop: all groups stepped together, aggregated, sampled, each
fed its own tokens) for `batch_size` held-out problems and `max_new_tokens`, under the first
aggregation rule. The stack runs on one device, as the command runs it. Weights are abstract;
the tokenizers are the teachers' own (the alignment tables come from them), so teachers must
be models with tokenizers (built-in names, GGUF files or HF directories).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import aot, sampling
from jaxdistill import mesh as mesh_lib
from jaxdistill.models.loading import DTYPES, describe
from jaxdistill.models.transformer import Decoder
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import lockstep
from jaxdistill.teachers.run import problems, validate
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack


def abstract_stack(config, mesh) -> TeacherStack:
    """The configured stack with abstract parameters (real tokenizers, so real alignment tables)."""
    loaded = {}
    for teacher in config.teachers:
        if teacher["model"] not in loaded:
            model_config, tokenizer = describe(teacher["model"])
            dtype = DTYPES[config.dtype]
            model = nnx.eval_shape(lambda c=model_config, d=dtype: Decoder(c, rngs=nnx.Rngs(0), param_dtype=d))
            loaded[teacher["model"]] = (mesh_lib.shard_model(model, mesh), tokenizer)
    return TeacherStack([TeacherConfig.from_config(t) for t in config.teachers], pivot=config.pivot or None,
                        width=config.width, dtype=config.dtype, mesh=mesh, loaded=loaded,
                        fewshot=problems(config).fewshot, fewshot_ends_turn=config.get("fewshot_ends_turn", False))


def placed(tree, mesh):
    """Every array of `tree` as an abstract array on `mesh` (replicated unless it has a sharding)."""
    whole = NamedSharding(mesh, PartitionSpec())

    def one(x):
        sharding = getattr(x, "sharding", None)
        sharding = sharding if isinstance(sharding, NamedSharding) and sharding.mesh == mesh else whole
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def programs(config, target: aot.Target):
    validate(config)
    mesh = mesh_lib.make_mesh({"data": 1}, devices=target.devices[:1])
    stack = abstract_stack(config, mesh)
    records = problems(config).test[: config.batch_size]
    rows = sampling.bucket(len(records), minimum=1)
    groups = placed(stack.inputs(records, rows=rows, new=config.max_new_tokens), mesh)
    slots = sampling.bucket(config.max_new_tokens)
    rule = agg_lib.rule_from_config(config.rules[0], threshold=config.gate_threshold)
    settings = stack.settings(aggregate=rule, rule=sampling.rule_from_config(config.temperature), top_k=config.top_k,
                              new_slots=slots, cache_steps=slots)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=NamedSharding(mesh, PartitionSpec()))
    start = aot.Program("lockstep_start", lockstep.start, (settings, groups, key))
    state = aot.outputs_of(start, (yield start))
    weights = stack.weights(rows)[:, stack.order]
    forced = (np.zeros((rows, slots), np.int32), np.zeros(rows, np.int32))
    rest = placed((jnp.asarray(weights), jnp.asarray(stack.allowed), stack.stops, jnp.int32(config.max_new_tokens),
                   forced), mesh)
    yield aot.Program("lockstep_advance", lockstep.advance, (settings, groups, state, *rest))
