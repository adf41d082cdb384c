"""One transformer block's forward, in pieces the decoder and its hand-written backward share:
norms, the rotary embedding, projections as 2D matmuls, dense attention over [cache, new tokens]
and the block itself (attention half, then the gated MLP half)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.config import ModelConfig, rope_frequencies

MASKED = -1e30  # finite so a fully masked (padding) query row stays NaN-free


def visibility(query_positions, key_positions, window):
    """[B, Tq, Tk] masks (global, local): real key, not in the future, and (local) within the window."""
    q, k = query_positions[:, :, None], key_positions[:, None, :]
    visible = (k >= 0) & (k <= q)
    return visible, visible & (q - k < window)


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim, theta, c: ModelConfig):
    inv_freq, factor = rope_frequencies(head_dim, theta, c.rope_scaling)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor  # [B, T, head_dim/2]


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head (the Hugging Face layout). x: [B, T, N, D]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def linear(x, w, dims: int = 1):
    """x's last `dims` axes times w's first `dims` axes, as one 2D matmul.

    XLA:CPU runs plain 2D matmuls (and their transposes in `linear_backward`) much faster
    than the batched einsums JAX's autodiff derives from `btd,dhk->bthk`.
    """
    inner = math.prod(w.shape[:dims])
    y = x.reshape(-1, inner) @ w.reshape(inner, -1)
    return y.reshape(*x.shape[: x.ndim - dims], *w.shape[dims:])


def lora_factors(weight: str) -> tuple[str, str]:
    """The names of a weight's LoRA factors A and B in a layer's parameters."""
    return f"{weight}_lora_a", f"{weight}_lora_b"


def fold_lora(w, a, b, scale: float):
    """One layer's W + scale * A B (A [*in, r], B [r, *out]), the product in float32, in W's dtype."""
    rank = a.shape[-1]
    delta = jnp.matmul(a.reshape(-1, rank), b.reshape(rank, -1), preferred_element_type=jnp.float32)
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def project(x, p, name: str, dtype, dims: int = 1, lora=None):
    """x times the weight `name` (`linear`), plus its LoRA adapter where `p` holds one: with
    lora = (scale, dropout rate, key or None, training), `scale * dropout(x) A B` (no dropout without
    a key). Outside training, the adapter is folded into the weight (W + scale A B, one matmul)
    when that costs fewer FLOPs than running it beside, as for long prompts: it also spares the
    low-rank path's full-width output (a batch-sized temporary per projection)."""
    name_a, name_b = lora_factors(name)
    if name_a not in p:
        return linear(x, p[name].astype(dtype), dims)
    scale, rate, key, training = lora
    a, b = p[name_a].astype(dtype), p[name_b].astype(dtype)
    rows, d_in, d_out = math.prod(x.shape[: x.ndim - dims]), math.prod(a.shape[:-1]), math.prod(b.shape[1:])
    if not training and rows * (d_in + d_out) > d_in * d_out:
        return linear(x, fold_lora(p[name], a, b, scale).astype(dtype), dims)
    y = linear(x, p[name].astype(dtype), dims)
    if rate and key is not None:
        keep = jax.random.bernoulli(jax.random.fold_in(key, sorted(p).index(name)), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    return y + (scale * linear(linear(x, a, dims), b)).astype(y.dtype)


def attention_extras(p) -> dict:
    """The optional attention parameters a layer has (biases, q/k norms)."""
    return {name: p[name] for name in ("bq", "bk", "bv", "q_norm", "k_norm") if name in p}


def attention_inputs(c: ModelConfig, dtype, extras, qp, kp, vp, cos, sin):
    """Projections [B, T, heads, D] -> attention's q [B, K, G, T, D], k and v [B, K, T, D].

    Everything elementwise between the projections and attention: biases, q/k norms,
    the rotary embedding and the attention scale. `extras` holds the parameters of those.
    """
    if c.qkv_bias:
        qp, kp, vp = qp + extras["bq"].astype(dtype), kp + extras["bk"].astype(dtype), vp + extras["bv"].astype(dtype)
    if c.qk_norm:
        qp, kp = rms_norm(qp, extras["q_norm"], c.norm_eps), rms_norm(kp, extras["k_norm"], c.norm_eps)
    qp, kp = apply_rope(qp, cos, sin), apply_rope(kp, cos, sin)
    qp = qp * jnp.asarray(c.attention_scale, dtype)
    b, t, heads, dh = qp.shape
    q = qp.reshape(b, t, c.num_kv_heads, heads // c.num_kv_heads, dh).transpose(0, 2, 3, 1, 4)
    return q, kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3)  # only the new tokens move


def masked_scores(q, k, mask):
    """Masked float32 attention scores [B, K, G, T, S] of q [B, K, G, T, D] over k [B, K, S, D]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], scores, MASKED)


def attend(q, k, v, mask, old):
    """Attention of q over [cached tokens `old` = (k, v, mask), new k/v]; returns [B, T, heads, D]."""
    dtype = q.dtype
    blocks = [(k, v, mask)]
    if old is not None:  # attend over [cache, new tokens] without copying the cache
        blocks.insert(0, (old[0].astype(dtype), old[1].astype(dtype), old[2]))
    scores = jnp.concatenate([masked_scores(q, kb, m) for kb, _, m in blocks], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    sizes = np.cumsum([kb.shape[2] for kb, _, _ in blocks])[:-1]
    out = sum(jnp.einsum("bkgts,bksd->bkgtd", pb, vb)
              for pb, (_, vb, _) in zip(jnp.split(probs, sizes, axis=-1), blocks, strict=True))
    b, kv, g, t, dh = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, dh)


def post_norm(c: ModelConfig, scale, x):
    """Gemma's sandwich norm on a sub-layer's output; the identity elsewhere."""
    return rms_norm(x, scale, c.norm_eps) if c.sandwich_norm else x


def gated(c: ModelConfig, gate, up):
    return (jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)) * up


def block(c: ModelConfig, dtype, p, x, mask_new, old, cos, sin, fused=None, lora=None):
    """One transformer block. `old`: (k, v, mask) of the cached tokens, or None. `fused`:
    a fused self-attention (q, k, v) -> [B, T, heads, D] used instead of the dense path.
    `lora`: (scale, dropout rate, key, training) for the LoRA adapters `p` holds (see `project`).

    Returns the new x, this call's keys/values [B, K, T, D] for the cache, and the
    activations `block_backward` reuses (unused ones cost nothing: XLA drops them).
    """
    w = lambda x, name, dims=1: project(x, p, name, dtype, dims, lora)  # noqa: E731
    h = rms_norm(x, p["attn_norm"], c.norm_eps)
    proj = tuple(w(h, name) for name in ("wq", "wk", "wv"))
    q, k, v = attention_inputs(c, dtype, attention_extras(p), *proj, cos, sin)
    attn = attend(q, k, v, mask_new, old) if fused is None else fused(q, k, v)
    a = w(attn, "wo", dims=2)
    x1 = x + post_norm(c, p.get("attn_post_norm"), a)
    h2 = rms_norm(x1, p["mlp_norm"], c.norm_eps)
    gate, up = w(h2, "w_gate"), w(h2, "w_up")
    y = w(gated(c, gate, up), "w_down")
    saved = {"x": x, "proj": proj, "attn": attn, "x1": x1, "gate": gate, "up": up}
    if c.sandwich_norm:
        saved |= {"a": a, "y": y}
    return x1 + post_norm(c, p.get("mlp_post_norm"), y), k, v, saved
