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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.errors import ConfigError
from jaxdistill.models import attention as attention_lib
from jaxdistill.models import backward, blocks
from jaxdistill.models.config import ModelConfig

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
    (`block_backward`), about twice as fast as autodiff on XLA:CPU; `custom_backward=False`
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
        self.lora = None  # a lora.LoraConfig once `lora.add_lora` gives the model adapters
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
                      grad_rows_stride: int = 1, base: bool = False, frozen_rows_base: bool = False,
                      dropout_key=None):
        """Final-normed hidden states [B, T, d_model] and the updated cache (or None).

        grad_rows_stride=s: only rows 0, s, 2s, ... are differentiated; the others must not
        be (put their outputs under stop_gradient) and keep no activations for the backward.
        Self-distillation interleaves student and teacher rows and passes 2.
        With LoRA adapters: `base` runs the base model (adapters off), `frozen_rows_base` only
        for the rows outside the stride (the frozen-base teacher); `dropout_key` marks a training
        forward: the adapters' dropout draws from it, and the adapters run beside their weights
        (without it they may be folded into them, `blocks.project`).
        """
        adapters = dict(lora_key=dropout_key, adapters=not base)
        if grad_rows_stride > 1 and not self.custom_backward:
            if cache is not None:
                raise ValueError("grad_rows_stride is for training, without a cache.")
            return self._frozen_rows_apart(tokens, positions, mask, grad_rows_stride, base or frozen_rows_base,
                                           dropout_key), None
        hidden, k, v, positions = self._run(tokens, positions, mask, cache, grad_rows_stride, **adapters)
        return hidden, (None if cache is None else cache.write(k, v, positions))

    def _frozen_rows_apart(self, tokens, positions, mask, stride, frozen_base=False, dropout_key=None):
        """Autodiff's grad_rows_stride: the differentiated rows and the frozen ones (parameters
        under stop_gradient, so their backward is never built) as two passes of half the batch.
        `frozen_base`: the frozen rows run without LoRA adapters."""
        tokens = jnp.asarray(tokens)
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        b = tokens.shape[0]
        group = lambda x: x.reshape(b // stride, stride, *x.shape[1:])  # noqa: E731
        part = lambda x, rows: None if x is None else group(x)[:, rows].reshape(-1, *x.shape[1:])  # noqa: E731
        grad_rows, frozen_rows = slice(0, 1), slice(1, stride)
        live = self._run(part(tokens, grad_rows), part(positions, grad_rows), part(mask, grad_rows), None,
                         lora_key=dropout_key)[0]
        frozen = self._run(part(tokens, frozen_rows), part(positions, frozen_rows), part(mask, frozen_rows), None,
                           frozen=True, adapters=not frozen_base)[0]
        frozen = jax.lax.stop_gradient(frozen)
        together = jnp.concatenate([live.reshape(b // stride, 1, *live.shape[1:]),
                                    frozen.reshape(b // stride, stride - 1, *frozen.shape[1:])], axis=1)
        return together.reshape(b, *live.shape[1:])

    def prefill(self, tokens, mask=None, *, slots: int):
        """Run prompts and return their hidden states and a fresh `slots`-slot cache holding them."""
        hidden, k, v, positions = self._run(tokens, None, mask, None)
        cache = KVCache.empty(self.config, tokens.shape[0], slots, self.compute_dtype)
        return hidden, cache.write(k, v, positions)

    def _run(self, tokens, positions, mask, cache, grad_rows_stride: int = 1, frozen: bool = False,
             adapters: bool = True, lora_key=None):
        """Hidden states plus this call's keys/values [layers, B, K, T, D] and positions.
        `frozen`: parameters under stop_gradient. `adapters`: run the LoRA adapters (if any);
        `lora_key`: the key of a training forward (None: not training, no dropout)."""
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
        masks_new = (None, None) if fused else blocks.visibility(positions, positions, window)  # fused: no [B, T, T]
        masks_old = blocks.visibility(positions, cache.positions, window) if cache is not None else None

        rope_global = blocks.rope_tables(positions, c.head_dim, c.rope_theta, c)
        rope_local = blocks.rope_tables(positions, c.head_dim, c.local_rope_theta or c.rope_theta, c)

        params = read(self.layers.arrays())
        if self.lora is None or not adapters:
            params = {name: w for name, w in params.items() if "_lora_" not in name}
        training = lora_key is not None  # the adapters get gradients: never fold them into the weights
        dropout = self.lora is not None and adapters and self.lora.dropout > 0 and training
        layer_keys = jax.random.split(lora_key, c.num_layers) if dropout else None

        def block(x, scanned):
            p, is_local, k_old, v_old, layer_key = scanned
            lora = None if self.lora is None else (self.lora.scale, self.lora.dropout, layer_key, training)
            pick = lambda pair: jnp.where(is_local, pair[1], pair[0])  # noqa: E731
            mask = None if fused else pick(masks_new)
            cos, sin = pick((rope_global[0], rope_local[0])), pick((rope_global[1], rope_local[1]))
            if fused:
                attend = functools.partial(attention_lib.self_attention, self.attention, positions=positions,
                                           window=c.sliding_window, is_local=is_local if any(c.layer_is_local)
                                           else None, mesh=self.mesh)
                x, k_new, v_new, _ = blocks.block(c, self.compute_dtype, p, x, None, None, cos, sin, fused=attend,
                                                  lora=lora)
            elif cache is not None:
                x, k_new, v_new, _ = blocks.block(c, self.compute_dtype, p, x, mask, (k_old, v_old, pick(masks_old)),
                                                  cos, sin, lora=lora)
            elif self.custom_backward:
                x, k_new, v_new = backward.train_block(c, self.compute_dtype, self.remat, grad_rows_stride, p, x, mask,
                                               cos, sin)
            else:
                x, k_new, v_new, _ = blocks.block(c, self.compute_dtype, p, x, mask, None, cos, sin, lora=lora)
            return x, (k_new, v_new)

        if self.remat != "none" and not self.custom_backward:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat])
        is_local = jnp.asarray(np.array(c.layer_is_local))
        old_kv = (cache.k, cache.v) if cache is not None else (None, None)
        # The scan emits only this call's keys/values; the caller writes them into the cache once.
        x, (k_new, v_new) = jax.lax.scan(block, x, (params, is_local, *old_kv, layer_keys))
        return blocks.rms_norm(x, read(self.final_norm[...]), c.norm_eps), k_new, v_new, positions
