"""A Flax NNX decoder-only transformer for the Llama family and Gemma 3.

Per-layer weights are stacked along a leading `layers` axis and the blocks run under
`jax.lax.scan`, so compile time does not grow with depth. Every parameter carries its
logical axis names in the `axes` metadata; `jaxdistill.mesh` maps them to a mesh.

Attention masks come from token positions: a key is visible to a query when it is a
real token (position >= 0), not in the future, and, for local layers, inside the
sliding window. Left-padded batches, the KV cache and aligned teacher/student
contexts all use this one rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.errors import ConfigError
from jaxdistill.models import attention as attention_lib
from jaxdistill.models.config import ModelConfig, rope_frequencies

_MASKED = -1e30  # finite so a fully masked (padding) query row stays NaN-free

# What autodiff keeps of each block for the backward (`remat`); the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # keep everything: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),  # ...in host RAM
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, plus the position held in each slot (-1: empty)."""

    k: jax.Array  # [layers, batch, kv_heads, slots, head_dim]: (batch, head) lead, as attention wants
    v: jax.Array
    positions: jax.Array  # [batch, slots] int32
    index: jax.Array  # [] int32: the next slot to write

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, slots), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
        """Store new keys/values [layers, B, K, T, D] and their positions [B, T] at `index`."""
        start = (0, 0, 0, self.index, 0)
        return KVCache(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start),
            positions=jax.lax.dynamic_update_slice(self.positions, positions, (0, self.index)),
            index=self.index + positions.shape[1],
        )


def _layer_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """name -> (shape without the layers axis, logical axes, initialiser)."""
    d, h, k, dh, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff
    shapes = {
        "attn_norm": ((d,), ("norm",), "ones"),
        "wq": ((d, h, dh), ("embed", "heads", "head_dim"), "normal"),
        "wk": ((d, k, dh), ("embed", "kv_heads", "head_dim"), "normal"),
        "wv": ((d, k, dh), ("embed", "kv_heads", "head_dim"), "normal"),
        "wo": ((h, dh, d), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((d,), ("norm",), "ones"),
        "w_gate": ((d, f), ("embed", "mlp"), "normal"),
        "w_up": ((d, f), ("embed", "mlp"), "normal"),
        "w_down": ((f, d), ("mlp", "embed"), "normal"),
    }
    if c.qkv_bias:
        shapes["bq"] = ((h, dh), ("heads", "head_dim"), "zeros")
        shapes["bk"] = ((k, dh), ("kv_heads", "head_dim"), "zeros")
        shapes["bv"] = ((k, dh), ("kv_heads", "head_dim"), "zeros")
    if c.qk_norm:
        shapes["q_norm"] = ((dh,), ("norm",), "ones")
        shapes["k_norm"] = ((dh,), ("norm",), "ones")
    if c.sandwich_norm:
        shapes["attn_post_norm"] = ((d,), ("norm",), "ones")
        shapes["mlp_post_norm"] = ((d,), ("norm",), "ones")
    return shapes


def _init(kind: str, key, shape, dtype):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Layers(nnx.Module):
    """All transformer blocks' weights, each stacked over a leading `layers` axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        for name, (shape, axes, kind) in _layer_shapes(config).items():
            value = _init(kind, rngs.params(), (config.num_layers, *shape), param_dtype)
            setattr(self, name, nnx.Param(value, axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in vars(self) if isinstance(getattr(self, name), nnx.Param)}


class Decoder(nnx.Module):
    """`model(tokens)` -> logits [batch, time, vocab] (float32).

    Options: `positions` [B, T] (default: counted over `mask`), `mask` [B, T] marking
    real tokens, and `cache` (a KVCache) for incremental decoding, in which case the
    call returns `(logits, cache)`.

    `attention` picks the kernel of the uncached forward (`attention.IMPLEMENTATIONS`:
    "xla" dense scores, "flash" blockwise, "cudnn" on GPU, "splash" on TPU); decoding with
    a cache always uses the dense path (one query per row). `mesh` is only needed by splash.

    With attention="xla", training runs each block's hand-written backward
    (`_block_backward`), about twice as fast as autodiff on XLA:CPU; `custom_backward=False`
    differentiates the same forward with JAX (the reference the tests compare against), as
    every other kernel does. `remat` (a name in REMAT_POLICIES; True means "full") says what
    the backward keeps; the hand-written backward knows "none" and "full".
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        compute_dtype=None,
        remat: bool | str = False,
        custom_backward: bool | None = None,
        attention: str = "xla",
        mesh=None,
    ):
        remat = {True: "full", False: "none"}.get(remat, remat)
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={remat!r}: choose from {list(REMAT_POLICIES)} (or True/False).")
        if attention not in attention_lib.IMPLEMENTATIONS:
            raise ConfigError(f"attention={attention!r}: choose from {list(attention_lib.IMPLEMENTATIONS)}.")
        handwritten = attention == "xla" and remat in ("none", "full")
        if custom_backward and not handwritten:
            raise ConfigError(f"the hand-written backward needs attention=xla and remat none/full, not "
                              f"attention={attention}, remat={remat}; leave custom_backward unset.")
        self.config = config
        self.compute_dtype = compute_dtype or param_dtype
        self.remat = remat
        self.custom_backward = handwritten if custom_backward is None else custom_backward
        self.attention = attention
        self.mesh = mesh
        v, d = config.vocab_size, config.d_model
        self.embed = nnx.Param(_init("normal", rngs.params(), (v, d), param_dtype), axes=("vocab", "embed"))
        self.layers = Layers(config, rngs=rngs, param_dtype=param_dtype)
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype), axes=("norm",))
        if not config.tie_embeddings:
            self.lm_head = nnx.Param(_init("normal", rngs.params(), (d, v), param_dtype), axes=("embed", "vocab"))

    def __call__(self, tokens, positions=None, mask=None, *, cache: KVCache | None = None):
        hidden, new_cache = self.hidden_states(tokens, positions, mask, cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [..., d_model] -> float32 logits [..., vocab]."""
        if self.config.tie_embeddings:
            w = self.embed[...].astype(self.compute_dtype)
            return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].astype(self.compute_dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)

    def hidden_states(self, tokens, positions=None, mask=None, *, cache: KVCache | None = None,
                      grad_rows_stride: int = 1):
        """Final-normed hidden states [B, T, d_model] and the updated cache (or None).

        grad_rows_stride=s: only rows 0, s, 2s, ... are differentiated; the others must not
        be (put their outputs under stop_gradient) and keep no activations for the backward.
        Self-distillation interleaves student and teacher rows and passes 2.
        """
        if grad_rows_stride > 1 and not self.custom_backward:
            if cache is not None:
                raise ValueError("grad_rows_stride is for training, without a cache.")
            return self._frozen_rows_apart(tokens, positions, mask, grad_rows_stride), None
        hidden, k, v, positions = self._run(tokens, positions, mask, cache, grad_rows_stride)
        return hidden, (None if cache is None else cache.write(k, v, positions))

    def _frozen_rows_apart(self, tokens, positions, mask, stride):
        """Autodiff's grad_rows_stride: the differentiated rows and the frozen ones (parameters
        under stop_gradient, so their backward is never built) as two passes of half the batch."""
        tokens = jnp.asarray(tokens)
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        b = tokens.shape[0]
        group = lambda x: x.reshape(b // stride, stride, *x.shape[1:])  # noqa: E731
        part = lambda x, rows: None if x is None else group(x)[:, rows].reshape(-1, *x.shape[1:])  # noqa: E731
        grad_rows, frozen_rows = slice(0, 1), slice(1, stride)
        live = self._run(part(tokens, grad_rows), part(positions, grad_rows), part(mask, grad_rows), None)[0]
        frozen = self._run(part(tokens, frozen_rows), part(positions, frozen_rows), part(mask, frozen_rows), None,
                           frozen=True)[0]
        frozen = jax.lax.stop_gradient(frozen)
        together = jnp.concatenate([live.reshape(b // stride, 1, *live.shape[1:]),
                                    frozen.reshape(b // stride, stride - 1, *frozen.shape[1:])], axis=1)
        return together.reshape(b, *live.shape[1:])

    def prefill(self, tokens, mask=None, *, slots: int):
        """Run prompts and return their hidden states and a fresh `slots`-slot cache holding them."""
        hidden, k, v, positions = self._run(tokens, None, mask, None)
        cache = KVCache.empty(self.config, tokens.shape[0], slots, self.compute_dtype)
        return hidden, cache.write(k, v, positions)

    def _run(self, tokens, positions, mask, cache, grad_rows_stride: int = 1, frozen: bool = False):
        """Hidden states plus this call's keys/values [layers, B, K, T, D] and positions.
        `frozen`: parameters under stop_gradient."""
        c = self.config
        read = jax.lax.stop_gradient if frozen else (lambda x: x)
        tokens = jnp.asarray(tokens)
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        positions = jnp.where(mask, positions, -1).astype(jnp.int32)

        x = jnp.take(read(self.embed[...]), tokens, axis=0).astype(self.compute_dtype)
        if c.embed_scale:
            x = x * jnp.asarray(c.d_model**0.5, self.compute_dtype)

        window = c.sliding_window or 1
        fused = cache is None and self.attention != "xla"
        masks_new = (None, None) if fused else _visibility(positions, positions, window)  # fused: no [B, T, T]
        masks_old = _visibility(positions, cache.positions, window) if cache is not None else None

        rope_global = _rope_tables(positions, c.head_dim, c.rope_theta, c)
        rope_local = _rope_tables(positions, c.head_dim, c.local_rope_theta or c.rope_theta, c)

        def block(x, scanned):
            p, is_local, k_old, v_old = scanned
            pick = lambda pair: jnp.where(is_local, pair[1], pair[0])  # noqa: E731
            mask = None if fused else pick(masks_new)
            cos, sin = pick((rope_global[0], rope_local[0])), pick((rope_global[1], rope_local[1]))
            if fused:
                attend = functools.partial(attention_lib.self_attention, self.attention, positions=positions,
                                           window=c.sliding_window, is_local=is_local if any(c.layer_is_local)
                                           else None, mesh=self.mesh)
                x, k_new, v_new, _ = _block(c, self.compute_dtype, p, x, None, None, cos, sin, attend=attend)
            elif cache is not None:
                x, k_new, v_new, _ = _block(c, self.compute_dtype, p, x, mask, (k_old, v_old, pick(masks_old)),
                                            cos, sin)
            elif self.custom_backward:
                x, k_new, v_new = _train_block(c, self.compute_dtype, self.remat, grad_rows_stride, p, x, mask,
                                               cos, sin)
            else:
                x, k_new, v_new, _ = _block(c, self.compute_dtype, p, x, mask, None, cos, sin)
            return x, (k_new, v_new)

        if self.remat != "none" and not self.custom_backward:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat])
        is_local = jnp.asarray(np.array(c.layer_is_local))
        old_kv = (cache.k, cache.v) if cache is not None else (None, None)
        # The scan emits only this call's keys/values; the caller writes them into the cache once.
        x, (k_new, v_new) = jax.lax.scan(block, x, (read(self.layers.arrays()), is_local, *old_kv))
        return _rms_norm(x, read(self.final_norm[...]), c.norm_eps), k_new, v_new, positions


def _visibility(query_positions, key_positions, window):
    """[B, Tq, Tk] masks (global, local): real key, not in the future, and (local) within the window."""
    q, k = query_positions[:, :, None], key_positions[:, None, :]
    visible = (k >= 0) & (k <= q)
    return visible, visible & (q - k < window)


def _rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rope_tables(positions, head_dim, theta, c: ModelConfig):
    inv_freq, factor = rope_frequencies(head_dim, theta, c.rope_scaling)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor  # [B, T, head_dim/2]


def _apply_rope(x, cos, sin):
    """Rotate the two halves of each head (the Hugging Face layout). x: [B, T, N, D]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(x, w, dims: int = 1):
    """x's last `dims` axes times w's first `dims` axes, as one 2D matmul.

    XLA:CPU runs plain 2D matmuls (and their transposes in `_linear_backward`) much faster
    than the batched einsums JAX's autodiff derives from `btd,dhk->bthk`.
    """
    inner = math.prod(w.shape[:dims])
    y = x.reshape(-1, inner) @ w.reshape(inner, -1)
    return y.reshape(*x.shape[: x.ndim - dims], *w.shape[dims:])


def _linear_backward(x, w, dy, dims: int = 1):
    """(dx, dw) of `_linear(x, w, dims)` given its output cotangent dy; dw accumulates in float32."""
    inner = math.prod(w.shape[:dims])
    x2, w2 = x.reshape(-1, inner), w.reshape(inner, -1)
    dy2 = dy.reshape(x2.shape[0], -1)
    dw = jnp.matmul(x2.T, dy2, preferred_element_type=jnp.float32).reshape(w.shape)
    return (dy2 @ w2.T).reshape(x.shape), dw


def _attention_extras(p) -> dict:
    """The optional attention parameters a layer has (biases, q/k norms)."""
    return {name: p[name] for name in ("bq", "bk", "bv", "q_norm", "k_norm") if name in p}


def _attention_inputs(c: ModelConfig, dtype, extras, qp, kp, vp, cos, sin):
    """Projections [B, T, heads, D] -> attention's q [B, K, G, T, D], k and v [B, K, T, D].

    Everything elementwise between the projections and attention: biases, q/k norms,
    the rotary embedding and the attention scale. `extras` holds the parameters of those.
    """
    if c.qkv_bias:
        qp, kp, vp = qp + extras["bq"].astype(dtype), kp + extras["bk"].astype(dtype), vp + extras["bv"].astype(dtype)
    if c.qk_norm:
        qp, kp = _rms_norm(qp, extras["q_norm"], c.norm_eps), _rms_norm(kp, extras["k_norm"], c.norm_eps)
    qp, kp = _apply_rope(qp, cos, sin), _apply_rope(kp, cos, sin)
    qp = qp * jnp.asarray(c.attention_scale, dtype)
    b, t, heads, dh = qp.shape
    q = qp.reshape(b, t, c.num_kv_heads, heads // c.num_kv_heads, dh).transpose(0, 2, 3, 1, 4)
    return q, kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3)  # only the new tokens move


def _scores(q, k, mask):
    """Masked float32 attention scores [B, K, G, T, S] of q [B, K, G, T, D] over k [B, K, S, D]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], scores, _MASKED)


def _attend(q, k, v, mask, old):
    """Attention of q over [cached tokens `old` = (k, v, mask), new k/v]; returns [B, T, heads, D]."""
    dtype = q.dtype
    blocks = [(k, v, mask)]
    if old is not None:  # attend over [cache, new tokens] without copying the cache
        blocks.insert(0, (old[0].astype(dtype), old[1].astype(dtype), old[2]))
    scores = jnp.concatenate([_scores(q, kb, m) for kb, _, m in blocks], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    sizes = np.cumsum([kb.shape[2] for kb, _, _ in blocks])[:-1]
    out = sum(jnp.einsum("bkgts,bksd->bkgtd", pb, vb)
              for pb, (_, vb, _) in zip(jnp.split(probs, sizes, axis=-1), blocks, strict=True))
    b, kv, g, t, dh = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, dh)


def _attend_backward(q, k, v, mask, d_out):
    """(dq, dk, dv) of `_attend` without a cache. The probabilities are recomputed from q
    and k rather than stored, so the backward keeps no [B, heads, T, T] tensor per layer."""
    b, kv, g, t, dh = q.shape
    d_out = d_out.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4)
    probs = jax.nn.softmax(_scores(q, k, mask), axis=-1)
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(q.dtype), d_out)
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    # Masked scores are constants: a fully masked (padding) query row spreads its probability
    # over masked keys, and none of that gradient may reach q or k.
    d_scores = jnp.where(mask[:, None, None], d_scores, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k)
    dk = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q)
    return dq, dk, dv


def _post_norm(c: ModelConfig, scale, x):
    """Gemma's sandwich norm on a sub-layer's output; the identity elsewhere."""
    return _rms_norm(x, scale, c.norm_eps) if c.sandwich_norm else x


def _gated(c: ModelConfig, gate, up):
    return (jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)) * up


def _block(c: ModelConfig, dtype, p, x, mask_new, old, cos, sin, attend=None):
    """One transformer block. `old`: (k, v, mask) of the cached tokens, or None. `attend`:
    a fused self-attention (q, k, v) -> [B, T, heads, D] used instead of the dense path.

    Returns the new x, this call's keys/values [B, K, T, D] for the cache, and the
    activations `_block_backward` reuses (unused ones cost nothing: XLA drops them).
    """
    w = lambda name: p[name].astype(dtype)  # noqa: E731
    h = _rms_norm(x, p["attn_norm"], c.norm_eps)
    proj = tuple(_linear(h, w(name)) for name in ("wq", "wk", "wv"))
    q, k, v = _attention_inputs(c, dtype, _attention_extras(p), *proj, cos, sin)
    attn = _attend(q, k, v, mask_new, old) if attend is None else attend(q, k, v)
    a = _linear(attn, w("wo"), dims=2)
    x1 = x + _post_norm(c, p.get("attn_post_norm"), a)
    h2 = _rms_norm(x1, p["mlp_norm"], c.norm_eps)
    gate, up = _linear(h2, w("w_gate")), _linear(h2, w("w_up"))
    y = _linear(_gated(c, gate, up), w("w_down"))
    saved = {"x": x, "proj": proj, "attn": attn, "x1": x1, "gate": gate, "up": up}
    if c.sandwich_norm:
        saved |= {"a": a, "y": y}
    return x1 + _post_norm(c, p.get("mlp_post_norm"), y), k, v, saved


def _block_backward(c: ModelConfig, dtype, p, mask, cos, sin, saved, d_out, d_k, d_v):
    """Hand-written backward of `_block` (no cache): (parameter gradients, dx).

    Matmuls go through `_linear_backward`; the elementwise pieces (norms, rotary
    embedding, activation) are recomputed and differentiated with jax.vjp.
    """
    w = lambda name: p[name].astype(dtype)  # noqa: E731
    grads = {}
    norm = lambda x, scale: _rms_norm(x, scale, c.norm_eps)  # noqa: E731

    d_y = d_out  # MLP half
    if c.sandwich_norm:
        d_y, grads["mlp_post_norm"] = jax.vjp(norm, saved["y"], p["mlp_post_norm"])[1](d_out)
    hidden, gated_vjp = jax.vjp(lambda g, u: _gated(c, g, u), saved["gate"], saved["up"])
    d_hidden, grads["w_down"] = _linear_backward(hidden, w("w_down"), d_y)
    d_gate, d_up = gated_vjp(d_hidden)
    h2, norm_vjp = jax.vjp(norm, saved["x1"], p["mlp_norm"])
    d_h2_gate, grads["w_gate"] = _linear_backward(h2, w("w_gate"), d_gate)
    d_h2_up, grads["w_up"] = _linear_backward(h2, w("w_up"), d_up)
    d_x1, grads["mlp_norm"] = norm_vjp(d_h2_gate + d_h2_up)
    d_x1 = d_x1 + d_out

    d_a = d_x1  # attention half
    if c.sandwich_norm:
        d_a, grads["attn_post_norm"] = jax.vjp(norm, saved["a"], p["attn_post_norm"])[1](d_x1)
    d_attn, grads["wo"] = _linear_backward(saved["attn"], w("wo"), d_a, dims=2)
    (q, k, v), inputs_vjp = jax.vjp(lambda e, *proj: _attention_inputs(c, dtype, e, *proj, cos, sin),
                                    _attention_extras(p), *saved["proj"])
    dq, dk, dv = _attend_backward(q, k, v, mask, d_attn)
    d_extras, *d_proj = inputs_vjp((dq, dk + d_k.astype(dtype), dv + d_v.astype(dtype)))
    grads |= d_extras
    h, norm_vjp = jax.vjp(norm, saved["x"], p["attn_norm"])
    d_h = 0
    for name, d in zip(("wq", "wk", "wv"), d_proj, strict=True):
        d_h_part, grads[name] = _linear_backward(h, w(name), d)
        d_h = d_h + d_h_part
    d_x, grads["attn_norm"] = norm_vjp(d_h)
    grads = {name: g.astype(p[name].dtype) for name, g in grads.items()}
    return grads, d_x + d_x1


def _every(x, stride: int):
    """Rows 0, stride, 2*stride, ... of x (a reshape, so a batch sharded in whole strides stays local)."""
    return x if stride == 1 else x.reshape(x.shape[0] // stride, stride, *x.shape[1:])[:, 0]


def _spread(x, stride: int):
    """Inverse of `_every`: x's rows at 0, stride, 2*stride, ..., zeros between them."""
    if stride == 1:
        return x
    rows = x[:, None]
    zeros = jnp.zeros((x.shape[0], stride - 1, *x.shape[1:]), x.dtype)
    return jnp.concatenate([rows, zeros], axis=1).reshape(x.shape[0] * stride, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _train_block(c: ModelConfig, dtype, remat: bool, stride: int, p, x, mask, cos, sin):
    """`_block` without a cache, differentiated by `_block_backward`.

    Only rows 0, stride, 2*stride, ... are differentiated; the others are constants for the
    backward (as under stop_gradient) and keep no activations. With `remat`, only the
    block's input is kept and the rest is recomputed in the backward.
    """
    out, k, v, _ = _block(c, dtype, p, x, mask, None, cos, sin)
    return out, k, v


def _train_block_forward(c, dtype, remat, stride, p, x, mask, cos, sin):
    out, k, v, saved = _block(c, dtype, p, x, mask, None, cos, sin)
    kept = {"x": x} if remat else saved
    return (out, k, v), (p, jax.tree.map(lambda a: _every(a, stride), (kept, mask, cos, sin)))


def _train_block_backward(c, dtype, remat, stride, residuals, cotangents):
    p, (saved, mask, cos, sin) = residuals
    d_out, d_k, d_v = (_every(t, stride) for t in cotangents)
    if remat:
        saved = _block(c, dtype, p, saved["x"], mask, None, cos, sin)[3]
    grads, d_x = _block_backward(c, dtype, p, mask, cos, sin, saved, d_out, d_k, d_v)
    return grads, _spread(d_x, stride), None, None, None


_train_block.defvjp(_train_block_forward, _train_block_backward)
