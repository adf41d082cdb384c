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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.models.config import ModelConfig, rope_frequencies

_MASKED = -1e30  # finite so a fully masked (padding) query row stays NaN-free


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
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        compute_dtype=None,
        remat: bool = False,
    ):
        self.config = config
        self.compute_dtype = compute_dtype or param_dtype
        self.remat = remat
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

    def hidden_states(self, tokens, positions=None, mask=None, *, cache: KVCache | None = None):
        """Final-normed hidden states [B, T, d_model] and the updated cache (or None)."""
        hidden, k, v, positions = self._run(tokens, positions, mask, cache)
        return hidden, (None if cache is None else cache.write(k, v, positions))

    def prefill(self, tokens, mask=None, *, slots: int):
        """Run prompts and return their hidden states and a fresh `slots`-slot cache holding them."""
        hidden, k, v, positions = self._run(tokens, None, mask, None)
        cache = KVCache.empty(self.config, tokens.shape[0], slots, self.compute_dtype)
        return hidden, cache.write(k, v, positions)

    def _run(self, tokens, positions, mask, cache):
        """Hidden states plus this call's keys/values [layers, B, K, T, D] and positions."""
        c = self.config
        tokens = jnp.asarray(tokens)
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        positions = jnp.where(mask, positions, -1).astype(jnp.int32)

        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.compute_dtype)
        if c.embed_scale:
            x = x * jnp.asarray(c.d_model**0.5, self.compute_dtype)

        window = c.sliding_window or 1
        masks_new = _visibility(positions, positions, window)
        masks_old = _visibility(positions, cache.positions, window) if cache is not None else None

        rope_global = _rope_tables(positions, c.head_dim, c.rope_theta, c)
        rope_local = _rope_tables(positions, c.head_dim, c.local_rope_theta or c.rope_theta, c)

        def block(x, scanned):
            p, is_local, k_old, v_old = scanned
            pick = lambda pair: jnp.where(is_local, pair[1], pair[0])  # noqa: E731
            old = (k_old, v_old, pick(masks_old)) if cache is not None else None
            x, k_new, v_new = _block(c, self.compute_dtype, p, x, pick(masks_new), old,
                                     pick((rope_global[0], rope_local[0])), pick((rope_global[1], rope_local[1])))
            return x, (k_new, v_new)

        if self.remat:
            block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
        is_local = jnp.asarray(np.array(c.layer_is_local))
        old_kv = (cache.k, cache.v) if cache is not None else (None, None)
        # The scan emits only this call's keys/values; the caller writes them into the cache once.
        x, (k_new, v_new) = jax.lax.scan(block, x, (self.layers.arrays(), is_local, *old_kv))
        return _rms_norm(x, self.final_norm[...], c.norm_eps), k_new, v_new, positions


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


def _block(c: ModelConfig, dtype, p, x, mask_new, old, cos, sin):
    """One transformer block. `old`: (k, v, mask) of the cached tokens, or None.

    Returns the new x and this call's keys/values [B, K, T, D] for the cache.
    """

    def w(name):
        return p[name].astype(dtype)

    h = _rms_norm(x, p["attn_norm"], c.norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, w("wq"))
    k = jnp.einsum("btd,dhk->bthk", h, w("wk"))
    v = jnp.einsum("btd,dhk->bthk", h, w("wv"))
    if c.qkv_bias:
        q, k, v = q + w("bq"), k + w("bk"), v + w("bv")
    if c.qk_norm:
        q, k = _rms_norm(q, p["q_norm"], c.norm_eps), _rms_norm(k, p["k_norm"], c.norm_eps)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    q = q * jnp.asarray(c.attention_scale, dtype)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]; only the new tokens move

    b, t, heads, dh = q.shape
    q = q.reshape(b, t, c.num_kv_heads, heads // c.num_kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    blocks = [(k, v, mask_new)]
    if old is not None:  # attend over [cache, new tokens] without copying the cache
        blocks.insert(0, (old[0].astype(dtype), old[1].astype(dtype), old[2]))
    scores = [
        jnp.where(m[:, None, None], jnp.einsum("bkgtd,bksd->bkgts", q, kb, preferred_element_type=jnp.float32),
                  _MASKED)
        for kb, _, m in blocks
    ]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dtype)
    sizes = np.cumsum([kb.shape[2] for kb, _, _ in blocks])[:-1]
    attn = sum(jnp.einsum("bkgts,bksd->bkgtd", pb, vb)
               for pb, (_, vb, _) in zip(jnp.split(probs, sizes, axis=-1), blocks, strict=True))
    attn = attn.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, dh)
    attn = jnp.einsum("bthk,hkd->btd", attn, w("wo"))
    if c.sandwich_norm:
        attn = _rms_norm(attn, p["attn_post_norm"], c.norm_eps)
    x = x + attn

    h = _rms_norm(x, p["mlp_norm"], c.norm_eps)
    gate = jnp.einsum("btd,df->btf", h, w("w_gate"))
    act = jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    mlp = jnp.einsum("btf,fd->btd", act * jnp.einsum("btd,df->btf", h, w("w_up")), w("w_down"))
    if c.sandwich_norm:
        mlp = _rms_norm(mlp, p["mlp_post_norm"], c.norm_eps)
    return x + mlp, k, v
