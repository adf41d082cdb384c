"""The hand-written block backward against JAX autodiff of the same forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from jaxdistill.models import Decoder

LLAMA = dict(arch="llama", layer_is_local=(False,) * 4, sliding_window=None, local_rope_theta=None, qk_norm=False,
             sandwich_norm=False, embed_scale=False, activation="silu")
CONFIGS = {"gemma3": {}, "llama": LLAMA, "qwen2": LLAMA | dict(qkv_bias=True)}


def _loss_and_grads(config, stride, compute_dtype=jnp.float32, **model_options):
    """A weighted sum of the hidden states of rows 0, stride, ... (the other rows under stop_gradient)."""
    model = Decoder(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype, **model_options)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, 12)))
    mask = jnp.asarray(np.arange(12)[None] >= np.array([0, 3, 1, 5])[:, None])  # left padding, all rows
    weights = jax.random.normal(jax.random.key(1), (4, 12, config.d_model))
    differentiated = (np.arange(4) % stride == 0)[:, None, None]
    custom = model_options.get("custom_backward", True)

    def loss(p):
        hidden = nnx.merge(graphdef, p).hidden_states(tokens, None, mask, grad_rows_stride=stride if custom else 1)[0]
        hidden = jnp.where(differentiated, hidden, jax.lax.stop_gradient(hidden))
        return jnp.sum(hidden.astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("remat", [False, True])
def test_block_backward_equals_autodiff(name, stride, remat):
    config = tiny_config(**CONFIGS[name])
    value, grads = _loss_and_grads(config, stride, custom_backward=False)
    value2, grads2 = _loss_and_grads(config, stride, remat=remat)
    assert float(value2) == pytest.approx(float(value), rel=1e-6)
    custom = dict(jax.tree_util.tree_leaves_with_path(grads2))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g2 = custom[path]
        scale = float(jnp.abs(g).max())
        assert scale > 0, path  # every parameter gets a gradient (the test can fail)
        np.testing.assert_allclose(g2, g, rtol=0, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_block_backward_in_bfloat16_stays_close_to_autodiff():
    config = tiny_config()
    _, grads = _loss_and_grads(config, 2, jnp.bfloat16, custom_backward=False)
    _, grads2 = _loss_and_grads(config, 2, jnp.bfloat16)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g2, g, rtol=0, atol=3e-2 * float(jnp.abs(g).max()))


def test_rows_outside_the_stride_get_no_gradient_and_their_inputs_do_not_matter():
    """With stride 2, changing a teacher row's tokens changes no gradient (its rows are constants)."""
    config = tiny_config(**LLAMA)
    model = Decoder(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 10))

    def grads(tokens):
        def loss(p):
            hidden = nnx.merge(graphdef, p).hidden_states(jnp.asarray(tokens), grad_rows_stride=2)[0]
            return jnp.sum(hidden[0::2] ** 2) + jnp.sum(jax.lax.stop_gradient(hidden[1::2]))
        return jax.grad(loss)(params)

    changed = tokens.copy()
    changed[1] = (changed[1] + 1) % config.vocab_size  # a teacher row
    for g, g2 in zip(jax.tree.leaves(grads(tokens)), jax.tree.leaves(grads(changed)), strict=True):
        np.testing.assert_array_equal(g, g2)
    changed[0] = (changed[0] + 1) % config.vocab_size  # a student row does change them
    assert not np.allclose(jax.tree.leaves(grads(tokens))[-1], jax.tree.leaves(grads(changed))[-1])
