"""The hand-written backward of a transformer block (`train_block`): about twice as fast as
autodiff on XLA:CPU, since its matmuls are plain 2D products and their transposes. Rows can be
left out of the backward (`stride`): self-distillation's teacher rows keep no activations."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxdistill.models import blocks
from jaxdistill.models.config import ModelConfig


def linear_backward(x, w, dy, dims: int = 1):
    """(dx, dw) of `blocks.linear(x, w, dims)` given its output cotangent dy; dw accumulates in float32."""
    inner = math.prod(w.shape[:dims])
    x2, w2 = x.reshape(-1, inner), w.reshape(inner, -1)
    dy2 = dy.reshape(x2.shape[0], -1)
    dw = jnp.matmul(x2.T, dy2, preferred_element_type=jnp.float32).reshape(w.shape)
    return (dy2 @ w2.T).reshape(x.shape), dw


def attend_backward(q, k, v, mask, d_out):
    """(dq, dk, dv) of `blocks.attend` without a cache. The probabilities are recomputed from q
    and k rather than stored, so the backward keeps no [B, heads, T, T] tensor per layer."""
    b, kv, g, t, dh = q.shape
    d_out = d_out.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4)
    probs = jax.nn.softmax(blocks.masked_scores(q, k, mask), axis=-1)
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(q.dtype), d_out)
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    # Masked scores are constants: a fully masked (padding) query row spreads its probability
    # over masked keys, and none of that gradient may reach q or k.
    d_scores = jnp.where(mask[:, None, None], d_scores, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k)
    dk = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q)
    return dq, dk, dv


def block_backward(c: ModelConfig, dtype, p, mask, cos, sin, saved, d_out, d_k, d_v):
    """Hand-written backward of `blocks.block` (no cache): (parameter gradients, dx).

    Matmuls go through `linear_backward`; the elementwise pieces (norms, rotary
    embedding, activation) are recomputed and differentiated with jax.vjp.
    """
    w = lambda name: p[name].astype(dtype)  # noqa: E731
    grads = {}
    norm = lambda x, scale: blocks.rms_norm(x, scale, c.norm_eps)  # noqa: E731

    d_y = d_out  # MLP half
    if c.sandwich_norm:
        d_y, grads["mlp_post_norm"] = jax.vjp(norm, saved["y"], p["mlp_post_norm"])[1](d_out)
    hidden, gated_vjp = jax.vjp(lambda g, u: blocks.gated(c, g, u), saved["gate"], saved["up"])
    d_hidden, grads["w_down"] = linear_backward(hidden, w("w_down"), d_y)
    d_gate, d_up = gated_vjp(d_hidden)
    h2, norm_vjp = jax.vjp(norm, saved["x1"], p["mlp_norm"])
    d_h2_gate, grads["w_gate"] = linear_backward(h2, w("w_gate"), d_gate)
    d_h2_up, grads["w_up"] = linear_backward(h2, w("w_up"), d_up)
    d_x1, grads["mlp_norm"] = norm_vjp(d_h2_gate + d_h2_up)
    d_x1 = d_x1 + d_out

    d_a = d_x1  # attention half
    if c.sandwich_norm:
        d_a, grads["attn_post_norm"] = jax.vjp(norm, saved["a"], p["attn_post_norm"])[1](d_x1)
    d_attn, grads["wo"] = linear_backward(saved["attn"], w("wo"), d_a, dims=2)
    (q, k, v), inputs_vjp = jax.vjp(lambda e, *proj: blocks.attention_inputs(c, dtype, e, *proj, cos, sin),
                                    blocks.attention_extras(p), *saved["proj"])
    dq, dk, dv = attend_backward(q, k, v, mask, d_attn)
    d_extras, *d_proj = inputs_vjp((dq, dk + d_k.astype(dtype), dv + d_v.astype(dtype)))
    grads |= d_extras
    h, norm_vjp = jax.vjp(norm, saved["x"], p["attn_norm"])
    d_h = 0
    for name, d in zip(("wq", "wk", "wv"), d_proj, strict=True):
        d_h_part, grads[name] = linear_backward(h, w(name), d)
        d_h = d_h + d_h_part
    d_x, grads["attn_norm"] = norm_vjp(d_h)
    grads = {name: g.astype(p[name].dtype) for name, g in grads.items()}
    return grads, d_x + d_x1


def every(x, stride: int):
    """Rows 0, stride, 2*stride, ... of x (a reshape, so a batch sharded in whole strides stays local)."""
    return x if stride == 1 else x.reshape(x.shape[0] // stride, stride, *x.shape[1:])[:, 0]


def spread(x, stride: int):
    """Inverse of `every`: x's rows at 0, stride, 2*stride, ..., zeros between them."""
    if stride == 1:
        return x
    rows = x[:, None]
    zeros = jnp.zeros((x.shape[0], stride - 1, *x.shape[1:]), x.dtype)
    return jnp.concatenate([rows, zeros], axis=1).reshape(x.shape[0] * stride, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def train_block(c: ModelConfig, dtype, remat: bool, stride: int, p, x, mask, cos, sin):
    """`blocks.block` without a cache, differentiated by `block_backward`.

    Only rows 0, stride, 2*stride, ... are differentiated; the others are constants for the
    backward (as under stop_gradient) and keep no activations. With `remat`, only the
    block's input is kept and the rest is recomputed in the backward.
    """
    out, k, v, _ = blocks.block(c, dtype, p, x, mask, None, cos, sin)
    return out, k, v


def train_block_forward(c, dtype, remat, stride, p, x, mask, cos, sin):
    out, k, v, saved = blocks.block(c, dtype, p, x, mask, None, cos, sin)
    kept = {"x": x} if remat else saved
    return (out, k, v), (p, jax.tree.map(lambda a: every(a, stride), (kept, mask, cos, sin)))


def train_block_backward(c, dtype, remat, stride, residuals, cotangents):
    p, (saved, mask, cos, sin) = residuals
    d_out, d_k, d_v = (every(t, stride) for t in cotangents)
    if remat:
        saved = blocks.block(c, dtype, p, saved["x"], mask, None, cos, sin)[3]
    grads, d_x = block_backward(c, dtype, p, mask, cos, sin, saved, d_out, d_k, d_v)
    return grads, spread(d_x, stride), None, None, None


train_block.defvjp(train_block_forward, train_block_backward)
