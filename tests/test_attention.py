"""Every attention kernel against the dense XLA reference: logits and gradients, on tiny models
with sliding windows, left and right padding and grouped heads; remat policies; the frozen
rows of autodiff's grad_rows_stride; and that flash's compiled temporaries grow linearly in T."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from jaxdistill.errors import ConfigError
from jaxdistill.models import Decoder
from jaxdistill.models.transformer import REMAT_POLICIES

LLAMA = dict(arch="llama", layer_is_local=(False,) * 4, sliding_window=None, local_rope_theta=None, qk_norm=False,
             sandwich_norm=False, embed_scale=False, activation="silu")
CONFIGS = {"gemma3": {}, "llama": LLAMA}  # gemma3: local (window 6) and global layers; both 2 query heads per kv
T = 40


def _batch(vocab):
    """Rows as the distillation batch lays them out: [padding, real tokens, padding]."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (4, T)))
    starts, ends = np.array([0, 3, 1, 5]), np.array([T, T - 4, T, T - 9])
    mask = (np.arange(T)[None] >= starts[:, None]) & (np.arange(T)[None] < ends[:, None])
    return tokens, jnp.asarray(mask)


@functools.cache
def _reference(name: str):
    """The dense, autodiff reference's (logits, (loss, gradients)) of CONFIGS[name], computed once per module."""
    config = tiny_config(**CONFIGS[name])
    tokens, mask = _batch(config.vocab_size)
    return _logits(Decoder(config, rngs=nnx.Rngs(0), custom_backward=False), tokens, mask), _loss_and_grads(
        config, custom_backward=False)


@nnx.jit
def _logits(model, tokens, mask):
    return model(tokens, None, mask)


def _loss_and_grads(config, stride=1, **options):
    """A fixed random projection of the real tokens' hidden states (rows 0, stride, ... differentiated)."""
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0), **options))
    tokens, mask = _batch(config.vocab_size)
    weights = jax.random.normal(jax.random.key(1), (4, T, config.d_model)) * mask[..., None]
    live = (np.arange(4) % stride == 0)[:, None, None]

    def loss(p):
        hidden = nnx.merge(graphdef, p).hidden_states(tokens, None, mask, grad_rows_stride=stride)[0]
        hidden = jnp.where(live, hidden, jax.lax.stop_gradient(hidden))
        return jnp.sum(hidden.astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(result, reference, tol=2e-5, value_rel=1e-5):
    (value, grads), (value_ref, grads_ref) = result, reference
    assert float(value) == pytest.approx(float(value_ref), rel=value_rel)
    ours = dict(jax.tree_util.tree_leaves_with_path(grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads_ref):
        scale = float(jnp.abs(g).max())
        assert scale > 0, path  # every parameter gets a gradient, so the comparison can fail
        np.testing.assert_allclose(ours[path], g, rtol=0, atol=tol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attention", ["flash", "cudnn_xla", "splash"])
def test_kernel_matches_the_dense_reference(name, attention):
    config = tiny_config(**CONFIGS[name])
    tokens, mask = _batch(config.vocab_size)
    logits_ref, reference = _reference(name)
    logits = _logits(Decoder(config, rngs=nnx.Rngs(0), attention=attention), tokens, mask)
    assert not jnp.isnan(logits).any()
    np.testing.assert_allclose(jnp.where(mask[..., None], logits, 0), jnp.where(mask[..., None], logits_ref, 0),
                               rtol=0, atol=1e-5)
    _assert_same(_loss_and_grads(config, attention=attention), reference)


def test_flash_with_small_key_blocks_and_fully_padded_blocks():
    """Blocks of 8 keys over rows whose first block is all padding: the online softmax must drop it."""
    from jaxdistill.models import attention

    rng = np.random.default_rng(1)
    b, kv, g, t, d = 2, 2, 2, 29, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, kv, g, t, d), (b, kv, t, d), (b, kv, t, d)))
    positions = jnp.asarray(np.where(np.arange(t)[None] >= np.array([[11], [0]]),
                                     np.arange(t)[None] - np.array([[11], [0]]), -1), jnp.int32)
    visible = (positions[:, None, :] >= 0) & (positions[:, None, :] <= positions[:, :, None])
    real = (positions >= 0)[:, None, None, :, None]

    def dense(q, k, v):
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, k)
        probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -1e30), axis=-1)
        return jnp.where(real, jnp.einsum("bkgts,bksd->bkgtd", probs, v), 0.0)

    blockwise = lambda q, k, v: attention.flash(q, k, v, positions, jnp.int32(2**31 - 1), 8)  # noqa: E731
    np.testing.assert_allclose(blockwise(q, k, v), dense(q, k, v), atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    grads = jax.vjp(blockwise, q, k, v)[1](cotangent)
    grads_ref = jax.vjp(dense, q, k, v)[1](cotangent)
    for ours, ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "offload"])  # offload needs pinned host memory
def test_remat_policies_give_the_same_gradients(remat):
    _assert_same(_loss_and_grads(tiny_config(), attention="flash", remat=remat), _reference("gemma3")[1])


@pytest.mark.parametrize("attention", ["xla", "flash"])
def test_autodiff_keeps_frozen_rows_out_of_the_backward(attention):
    """grad_rows_stride=2 under autodiff (frozen rows as a second, stop-gradient pass) equals the
    hand-written backward's stride 2."""
    config = tiny_config()
    _assert_same(_loss_and_grads(config, 2, attention=attention, custom_backward=False), _loss_and_grads(config, 2))


def test_unsupported_combinations_say_what_to_do():
    config = tiny_config()
    with pytest.raises(ConfigError, match="leave custom_backward unset"):
        Decoder(config, rngs=nnx.Rngs(0), attention="flash", custom_backward=True)
    with pytest.raises(ConfigError, match="choose from"):
        Decoder(config, rngs=nnx.Rngs(0), attention="fused")
    with pytest.raises(ConfigError, match="choose from"):
        Decoder(config, rngs=nnx.Rngs(0), remat="some")
    model = Decoder(config, rngs=nnx.Rngs(0), attention="cudnn")  # float32 is not a cuDNN dtype
    with pytest.raises(ValueError, match="compute_dtype bfloat16"):
        model(*_batch(config.vocab_size))


def _temp_bytes(attention, t):
    config = tiny_config(**(LLAMA | dict(num_layers=1, layer_is_local=(False,), max_seq_len=4096)))
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0), attention=attention, remat="full"))
    tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)

    def loss(p, tokens):
        return jnp.sum(nnx.merge(graphdef, p).hidden_states(tokens)[0] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_flash_temporaries_grow_linearly_with_length():
    """Doubling T doubles flash's compiled temporaries (within 5%); the dense path's quadruple."""
    flash = [_temp_bytes("flash", t) for t in (1024, 2048)]
    dense = [_temp_bytes("xla", t) for t in (1024, 2048)]
    assert flash[1] / flash[0] < 2.1, flash
    assert dense[1] / dense[0] > 3.5, dense
    assert flash[1] < dense[1] / 3


@pytest.mark.parametrize("attention", ["flash", "splash"])
def test_kernels_on_a_sharded_mesh(attention):
    """Batch over data x fsdp and weights over fsdp x tensor (8 CPU devices): the same logits
    as one device; splash runs in shard_map over the batch, since Pallas calls are not partitioned."""
    from jaxdistill import mesh as mesh_lib

    config = tiny_config()
    tokens, mask = _batch(config.vocab_size)
    reference = Decoder(config, rngs=nnx.Rngs(0))(tokens, None, mask)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = mesh_lib.shard_model(Decoder(config, rngs=nnx.Rngs(0), attention=attention, mesh=mesh), mesh)
    rows = mesh_lib.batch_sharding(mesh, 2)
    logits = jax.jit(lambda m, t, k: m(t, None, k))(model, jax.device_put(tokens, rows), jax.device_put(mask, rows))
    np.testing.assert_allclose(jnp.where(mask[..., None], logits, 0), jnp.where(mask[..., None], reference, 0),
                               rtol=0, atol=1e-5)


def test_distillation_step_is_the_same_with_flash():
    """The real loss (one forward over student and teacher rows, blend target) and its gradient:
    flash under autodiff equals the dense path with the hand-written backward."""
    from jaxdistill.distill.losses import LossConfig, TargetConfig
    from jaxdistill.distill.step import build_batch, distill_loss

    config = tiny_config()
    rng = np.random.default_rng(2)
    draw = lambda n: rng.integers(1, config.vocab_size, n).tolist()  # noqa: E731
    batch = build_batch([draw(5), draw(9)], [draw(14), draw(11)], [draw(7), draw(12)], pad_id=0, multiple=8)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    results = []
    for attention in ("xla", "flash"):
        graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0), attention=attention))
        loss = lambda p, g=graphdef: distill_loss(g, p, None, batch, TargetConfig(), LossConfig())[0]  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    _assert_same(results[1], results[0], tol=1e-4, value_rel=1e-4)  # a KL near 0: relative error is large


def test_the_training_config_refuses_an_unknown_kernel_before_loading_a_model():
    import importlib.util

    from jaxdistill.distill import train as train_lib

    spec = importlib.util.spec_from_file_location("default", "experiments/self_distill/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    train_lib.validate(config)
    config.attention = "fused"
    with pytest.raises(ConfigError, match="attention 'fused' is not one of"):
        train_lib.validate(config)
