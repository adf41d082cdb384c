"""Where arrays live on a mesh (not only their values), and ahead-of-time compiles for a TPU
topology on this CPU host: the compiled per-device memory is the check that a job fits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_model
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import aot, sampling
from jaxdistill import main as main_lib
from jaxdistill import mesh as mesh_lib
from jaxdistill.distill import step as step_lib
from jaxdistill.models import attention as attention_lib

BIG = dict(d_model=64, d_ff=128, num_heads=4, num_kv_heads=4)  # every matrix splits 8 ways over fsdp


def per_device_bytes(tree) -> int:
    """The most bytes any one device holds of the arrays in `tree`."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def state_on_mesh(fsdp: int, **optim):
    mesh = mesh_lib.make_mesh({"fsdp": fsdp}, devices=jax.devices()[:fsdp])
    tx = step_lib.make_optimizer(step_lib.OptimConfig(**optim))
    return mesh, tx, *step_lib.init_state(mesh_lib.shard_model(tiny_model(**BIG), mesh), tx, frozen_teacher=True)


def assert_placed_like_params(tx, state, mesh, min_moments=3 * 9):
    """Each moment, accumulated gradient and frozen-teacher leaf has its parameter's sharding;
    every other leaf (counters) is replicated on the same mesh."""
    params = jax.tree.map(lambda x: x.sharding, state.params)
    expected = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, params,
                                     transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
    moments = 0
    for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(expected), strict=True):
        assert got.sharding == want, (got.shape, got.sharding.spec, want.spec)
        moments += want.spec != PartitionSpec()
    assert moments >= min_moments  # mu, nu and accumulated gradients of every split matrix
    for got, want in zip(jax.tree.leaves(state.teacher_params), jax.tree.leaves(params), strict=True):
        assert got.sharding == want
    assert state.step.sharding == NamedSharding(mesh, PartitionSpec())


@pytest.mark.parametrize("mode", ["distill", "sparse"])  # the self-teacher and the teacher stack as the target
def test_every_train_state_leaf_lives_where_its_parameter_lives_before_and_after_a_step(mode):
    mesh, tx, graphdef, state = state_on_mesh(4, accumulate=2)
    assert_placed_like_params(tx, state, mesh)
    b = step_lib.build_batch([[3, 4], [5]] * 2, [[6, 7, 8], [9, 9]] * 2 if mode == "distill" else None,
                             [[10, 11, 2], [12, 2]] * 2, pad_id=0, multiple=8)
    if mode == "sparse":
        rng = np.random.default_rng(0)
        b["target_ids"] = rng.integers(0, 64, (4, 8, 5)).astype(np.int32)
        b["target_logprobs"] = np.log(rng.dirichlet(np.ones(5), (4, 8))).astype(np.float32)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, mode=mode), state, mesh,
                                   sparse_target=mode == "sparse")
    state, _ = step(state, mesh_lib.host_to_global(b, mesh), jax.random.key(0))
    assert_placed_like_params(tx, state, mesh)


def test_train_state_bytes_per_device_fall_as_one_over_fsdp():
    sizes = {}
    for n in (1, 2, 4, 8):
        _, _, _, state = state_on_mesh(n)
        sizes[n] = per_device_bytes(state)
    for n in (2, 4, 8):  # norms and counters stay whole: a little over 1/n
        assert sizes[1] / n <= sizes[n] < 1.1 * sizes[1] / n, sizes


def test_the_sampler_makes_its_kv_cache_split_over_the_batch():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = mesh_lib.shard_model(tiny_model(**BIG), mesh)
    graphdef, params = nnx.split(model)
    tokens, mask = mesh_lib.host_to_global(sampling.left_pad([[1, 2, 3]] * 8, 16, 8, 0), mesh)
    decoding, outputs = sampling._prefill_jit(graphdef, params, tokens, mask, None, new_slots=16, pad_id=0, mesh=mesh)
    assert decoding.cache.k.sharding.spec == PartitionSpec(None, ("data", "fsdp"), "tensor")
    assert per_device_bytes(decoding.cache.k) == decoding.cache.k.nbytes // 8
    assert all(x.sharding.spec[0] == ("data", "fsdp") for x in [decoding.logits, decoding.done, *outputs])


@pytest.fixture(scope="module")
def v5e():
    return aot.target("v5e:2x2")


def test_a_tpu_compile_holds_the_sharded_state_and_not_more(v5e):
    """Compiled for 4 TPU v5e chips with fsdp=4: the train step's arguments are the state split
    4 ways plus the batch, as the per-leaf shardings say (moments replicated would be ~3x)."""
    mesh = mesh_lib.make_mesh({"fsdp": 4}, devices=v5e.devices)
    config = dict(d_model=256, d_ff=512, num_heads=2, num_kv_heads=2, head_dim=128, vocab_size=512, sliding_window=0,
                  layer_is_local=(False,) * 4)
    model = mesh_lib.shard_model(nnx.eval_shape(lambda: tiny_model(**config)), mesh)
    tx = step_lib.make_optimizer(step_lib.OptimConfig())
    graphdef, state = step_lib.init_state(model, tx)
    batch = {name: aot.abstract(shape, dtype, mesh_lib.batch_sharding(mesh, len(shape))) for name, shape, dtype in (
        ("tokens", (8, 256), jnp.int32), ("mask", (8, 256), bool), ("target_mask", (4, 128), bool),
        ("end_mask", (4, 128), bool))}
    program = aot.Program("train_step", step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx), state, mesh),
                          (state, batch, jax.eval_shape(lambda: jax.random.key(0))))
    report, _ = aot.compile_program(program, v5e)
    shard = lambda x: np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize  # noqa: E731
    expected = sum(shard(x) for x in jax.tree.leaves((state, batch)))
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert expected < 0.3 * whole
    assert expected <= report.argument_bytes <= 1.05 * expected + 8192  # TPU tiles pad the tiny leaves
    assert report.alias_bytes > 0.9 * sum(shard(x) for x in jax.tree.leaves(state))  # the state is donated
    assert report.fits and report.device_memory == 16 * 2**30


def test_splash_lowers_the_mosaic_kernel_when_the_mesh_is_a_tpu(v5e):
    mesh = mesh_lib.make_mesh({"data": 4}, devices=v5e.devices)
    assert attention_lib.compiling_for(mesh) == "tpu" and attention_lib.compiling_for(None) == "cpu"
    q = aot.abstract((4, 2, 2, 256, 128), jnp.bfloat16, mesh_lib.batch_sharding(mesh, 5))
    kv = aot.abstract((4, 2, 256, 128), jnp.bfloat16, mesh_lib.batch_sharding(mesh, 4))
    positions = aot.abstract((4, 256), jnp.int32, mesh_lib.batch_sharding(mesh, 2))
    attend = jax.jit(lambda q, k, v, p: attention_lib.self_attention("splash", q, k, v, p, None, mesh=mesh))
    assert "tpu_custom_call" in attend.lower(q, kv, kv, positions).as_text()  # the real kernel, not the interpreter


def test_compile_command_reports_every_program_and_refuses_what_does_not_fit(tmp_path, capsys, v5e):
    model_dir = tmp_path / "tiny"  # a directory holding only config.json: no weights needed
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True)))
    out = tmp_path / "compile.json"
    args = ["jaxdistill", "compile", "--config=experiments/self_distill/default.py", "--target=v5e:2x2",
            f"--config.model={model_dir}", "--config.compile.prompt_tokens=32", "--config.sample.max_new_tokens=32",
            "--config.eval.max_new_tokens=32", "--config.eval.batch_size=4", "--config.mesh.data=1",
            "--config.mesh.fsdp=4", f"--out={out}"]
    assert main_lib.main(args) == 0
    report = json.loads(out.read_text())
    names = [p["program"] for p in report["programs"]]
    assert names == ["train_step", "rollout_prefill", "rollout_decode", "eval_prefill", "eval_decode", "eval_score"]
    assert report["devices"] == 4 and all(p["fits"] and p["peak_bytes"] > 0 for p in report["programs"])
    printed = capsys.readouterr().out
    assert printed.count("fits; compiled in") == 6 and "every program fits on v5e:2x2" in printed

    small = aot.Target("tiny", "tpu", v5e.devices, device_memory=2**20)  # 1 MiB: nothing fits
    program = aot.Program("train_step", jax.jit(lambda x: x @ x.T), (aot.abstract((1024, 1024), jnp.float32),))
    with pytest.raises(aot.DoesNotFit, match=r"train_step needs [\d.]+ GiB per device on tiny"):
        aot.compile_all((p for p in [program]), small)
    assert main_lib.main(["jaxdistill", "compile", "--config=experiments/self_distill/default.py"]) == 2
    assert "compile needs --target" in capsys.readouterr().err
    assert main_lib.main(["jaxdistill", "compile", "--config=experiments/self_distill/default.py",
                          "--target=v9z:3x3"]) == 2
    assert "'v9z:3x3' is not a TPU topology libtpu knows" in capsys.readouterr().err


def test_ppo_runs_split_over_the_mesh_keep_every_state_leaf_with_their_seeds():
    """The router's and the pruner's PPO (one trainer): with a mesh, each device trains its own
    seeds and holds only their parameters and moments; the policies equal a one-device run's."""
    from jaxdistill.rl import ppo
    from jaxdistill.router import env as env_lib

    rng = np.random.default_rng(0)
    q, m, d = 8, 7, 4  # 2 experts, T_max 2: 1 + 2 + 4 nodes
    env = env_lib.Env(quality=jnp.asarray(rng.uniform(size=(q, m)), jnp.float32),
                      cost=jnp.ones((q, m)), flops=jnp.ones((q, m)),
                      question_emb=jnp.asarray(rng.normal(size=(q, d)), jnp.float32),
                      answer_emb=jnp.asarray(rng.normal(size=(q, m, d)), jnp.float32), n_experts=2, t_max=2)
    config = ppo.PPOConfig(num_envs=8, num_steps=4, total_timesteps=8 * 4 * 2, hidden=(16,))
    train = ppo.make_train(config, env, env_lib.Rewards(), env_lib)
    keys, alphas = jax.random.split(jax.random.key(0), 4), jnp.asarray([0.0, 0.5])
    mesh = mesh_lib.make_mesh({"data": 4}, devices=jax.devices()[:4])
    states, metrics = ppo.train_grid(train, env, keys, alphas, mesh)
    alone, _ = ppo.train_grid(train, env, keys, alphas)
    for leaf, reference in zip(jax.tree.leaves(states), jax.tree.leaves(alone), strict=True):
        assert leaf.shape[:2] == (2, 4) and leaf.sharding.spec[:2] == (None, "data")
        assert per_device_bytes(leaf) == leaf.nbytes // 4
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(states.opt_state) and metrics["episode_return"].sharding.spec[:2] == (None, "data")


def test_route_and_teachers_jobs_compile_for_a_tpu(tmp_path, capsys, v5e):
    """`compile` knows the other systems' programs: the router's whole PPO run (seeds split over
    the chips) and the teacher stack's lockstep prefill and decode loop (abstract weights, the
    teachers' real tokenizers)."""
    route = ["jaxdistill", "compile", "--config=experiments/router/default.py", "--target=v5e:2x2",
             "--config.seeds=4", "--config.ppo.total_timesteps=1024", "--config.ppo.hidden=(16,)",
             f"--out={tmp_path / 'route.json'}"]
    assert main_lib.main(route) == 0
    (program,) = json.loads((tmp_path / "route.json").read_text())["programs"]
    assert program["program"] == "ppo_train" and program["fits"]
    _, config = main_lib._load_config_file("experiments/teachers/default.py")
    config.teachers = [dict(name="chat", model="smollm2-135m-instruct", style="chat")]  # lists: not a flag
    config.batch_size, config.max_new_tokens = 2, 8
    main_lib.compile_job(config, "v5e:2x2", str(tmp_path / "teachers.json"))
    names = [p["program"] for p in json.loads((tmp_path / "teachers.json").read_text())["programs"]]
    assert names == ["lockstep_start", "lockstep_advance"]
