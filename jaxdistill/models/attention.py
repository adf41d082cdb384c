"""Self-attention kernels for the uncached forward (training, scoring and the sampler's prefill).

Every implementation takes the same inputs: q [B, K, G, T, D] (already scaled), k and v
[B, K, T, D], token positions [B, T] (-1: padding) and the sliding window (None: global),
and applies the one visibility rule of `blocks.visibility`: a key is seen by a query
when it is a real token, not in the future and, for local layers, within the window.
They return [B, T, K*G, D].

- `xla`: dense float32 scores [B, K, G, T, T] (`blocks.attend`): the reference, the
  CPU default and the only one with the hand-written backward.
- `flash`: blockwise attention in plain JAX (online softmax over key blocks, a custom
  backward that recomputes each block). Temporaries are linear in T on every backend.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused kernel on
  NVIDIA GPUs (bfloat16/float16 only). `cudnn_xla` runs the same call with JAX's XLA
  implementation, which is how the wiring is tested on CPU.
- `splash`: Pallas splash attention for TPU (causal or local masks, segment ids for padding),
  interpreted on CPU for the tests. Under a mesh it runs inside shard_map over the batch; the
  mesh's devices (not the process's backend) decide whether the real kernel is lowered, so an
  ahead-of-time compile for a TPU on a CPU host gets the Mosaic kernel.

The fused kernels mask by index, not position: they need rows laid out as [padding, real
tokens with consecutive positions, padding], which is what every batch here looks like
(left-padded prompts followed by completions). `flash` and `xla` accept any positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "flash", "cudnn", "cudnn_xla", "splash")
_MASKED = -1e30
_NO_WINDOW = np.iinfo(np.int32).max


def self_attention(implementation: str, q, k, v, positions, window, is_local=None, *, mesh=None,
                   flash_block: int = 512):
    """Attention of q over k/v of the same tokens. `window`: the local layers' window; `is_local`
    (a traced bool, inside the layer scan) says whether this layer uses it (None: no local layers)."""
    if implementation == "flash":  # masks are computed per block, so a traced window is fine
        w = _NO_WINDOW if not window else (window if is_local is None else jnp.where(is_local, window, _NO_WINDOW))
        out = flash(q, k, v, positions, jnp.asarray(w, jnp.int32), flash_block)
    else:
        run = {"cudnn": functools.partial(_cudnn, implementation="cudnn"),
               "cudnn_xla": functools.partial(_cudnn, implementation="xla"),
               "splash": functools.partial(_splash, mesh=mesh)}[implementation]
        if is_local is None or not window:
            out = run(q, k, v, positions, window if is_local is None else None)
        else:  # the kernels take a static window: both variants, one executed per layer
            out = jax.lax.cond(is_local, lambda *a: run(*a, window), lambda *a: run(*a, None), q, k, v, positions)
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


# ---- flash: blockwise attention in plain JAX ----
# The loops are while_loops, not scans: under an outer grad, JAX's partial evaluation of a
# scan would precompute every block's mask (it depends only on positions) and stack them,
# a [blocks, B, K, G, T, block] array that is quadratic in T again. Nothing here is
# differentiated by JAX (the backward is written out), so a while_loop loses nothing.


def _padded_keys(k, v, positions, block):
    """k/v [B, K, S, D] and key positions [B, S], padded to whole blocks (padding invisible)."""
    pad = -k.shape[2] % block
    k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k, v))
    return k, v, jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)


def _key_block(i, block, k, v, k_positions):
    start = i * block
    take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, block, axis)  # noqa: E731
    return take(k, 2), take(v, 2), take(k_positions, 1)


def _block_scores(q, kb, q_positions, k_positions, window):
    """Scores [B, K, G, T, block] and their visibility mask [B, 1, 1, T, block]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, kb, preferred_element_type=jnp.float32)
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    visible = ((kp >= 0) & (kp <= qp) & (qp - kp < window))[:, None, None]
    return scores, visible


def _blocks_loop(body, count, init):
    return jax.lax.while_loop(lambda carry: carry[0] < count, lambda carry: (carry[0] + 1, *body(*carry)),
                              (jnp.int32(0), *init))[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash(q, k, v, positions, window, block: int = 512):
    """[B, K, G, T, D] attention output; queries with no visible key give zeros."""
    return _flash_forward(q, k, v, positions, window, block)[0]


def _flash_forward(q, k, v, positions, window, block):
    kp_all = _padded_keys(k, v, positions, block)

    def body(i, m, total, acc):
        kb, vb, kp = _key_block(i, block, *kp_all)
        scores, visible = _block_scores(q, kb, positions, kp, window)
        scores = jnp.where(visible, scores, _MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vb,
                                                    preferred_element_type=jnp.float32)
        return m_new, total * rescale + p.sum(axis=-1), acc

    stats = q.shape[:-1]
    init = (jnp.full(stats, _MASKED, jnp.float32), jnp.zeros(stats, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    m, total, acc = _blocks_loop(body, kp_all[0].shape[2] // block, init)
    seen = m > _MASKED / 2  # False: every key was masked (a padding query)
    out = jnp.where(seen[..., None], acc / total[..., None], 0.0).astype(q.dtype)
    lse = jnp.where(seen, m + jnp.log(total), jnp.inf)  # inf: no probability anywhere in the backward
    return out, (q, k, v, positions, window, out, lse)


def _flash_backward(block, residuals, d_out):
    q, k, v, positions, window, out, lse = residuals
    k_pad, v_pad, kp_pad = _padded_keys(k, v, positions, block)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def body(i, dq, dk, dv):
        kb, vb, kp = _key_block(i, block, k_pad, v_pad, kp_pad)
        scores, visible = _block_scores(q, kb, positions, kp, window)
        p = jnp.where(visible, jnp.exp(scores - lse[..., None]), 0.0)
        dv_b = jnp.einsum("bkgts,bkgtd->bksd", p.astype(q.dtype), d_out, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgtd,bksd->bkgts", d_out, vb, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(q.dtype)
        dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, kb, preferred_element_type=jnp.float32)
        dk_b = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=jnp.float32)
        put = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, i * block, 2)  # noqa: E731
        return dq, put(dk, dk_b), put(dv, dv_b)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k_pad.shape, jnp.float32), jnp.zeros(v_pad.shape, jnp.float32))
    dq, dk, dv = _blocks_loop(body, k_pad.shape[2] // block, init)
    s = k.shape[2]
    return dq.astype(q.dtype), dk[:, :, :s].astype(k.dtype), dv[:, :, :s].astype(v.dtype), None, None


flash.defvjp(lambda q, k, v, positions, window, block: _flash_forward(q, k, v, positions, window, block),
             _flash_backward)


# ---- the fused kernels: rows as [padding, real tokens, padding] ----

def _real_span(positions):
    """First real column and number of real tokens of each row."""
    real = positions >= 0
    return jnp.argmax(real, axis=1).astype(jnp.int32), real.sum(axis=1).astype(jnp.int32)


def _roll_rows(x, shift, axis):
    """Row b of x rolled left by shift[b] along `axis` (a gather; -shift undoes it)."""
    t = x.shape[axis]
    index = (jnp.arange(t)[None] + shift[:, None]) % t  # [B, T]
    index = index.reshape(index.shape[0], *([1] * (axis - 1)), t, *([1] * (x.ndim - axis - 1)))
    return jnp.take_along_axis(x, index, axis=axis)


def _cudnn(q, k, v, positions, window, *, implementation):
    """jax.nn.dot_product_attention with lengths and a causal mask: rows are rolled so their real
    tokens start at column 0 (cuDNN pads on the right), then rolled back."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention=cudnn needs compute_dtype bfloat16 or float16, not {q.dtype}; "
                         "set model.compute_dtype=bfloat16 or use attention=flash.")
    b, kv, g, t, d = q.shape
    start, length = _real_span(positions)
    query = _roll_rows(q.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d), start, 1)
    key, value = (_roll_rows(a.transpose(0, 2, 1, 3), start, 1) for a in (k, v))
    out = jax.nn.dot_product_attention(query, key, value, scale=1.0, is_causal=True, query_seq_lengths=length,
                                       key_value_seq_lengths=length,
                                       local_window_size=None if window is None else (window - 1, 0),
                                       implementation=implementation)
    out = _roll_rows(out, -start, 1)
    return out.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)


def compiling_for(mesh=None) -> str:
    """The platform a program is compiled for: its mesh's devices' (an ahead-of-time compile for a
    TPU on a CPU host builds its mesh of TPU devices), else the default backend's."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


SPLASH_BLOCK = 128  # the kernel's tile; sequences are padded to a multiple of it


def _splash(q, k, v, positions, window, *, mesh=None):
    """Pallas splash attention: one MQA kernel per (row, kv head); padding as segment 0."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b, kv, g, t, d = q.shape
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = padded - t
    shape = (padded, padded)
    head_mask = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), 0)
    interpret = compiling_for(mesh) != "tpu"  # the real Mosaic kernel on TPUs, the interpreter elsewhere
    kernel = kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([head_mask] * g), interpret=interpret)

    def run(q, k, v, segments):  # q [b, K, G, T, D], k/v [b, K, T, D], segments [b, T]
        one_row = lambda q, k, v, s: jax.vmap(  # noqa: E731
            lambda q, k, v: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(s, s)))(q, k, v)
        return jax.vmap(one_row)(q, k, v, segments)

    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k, v))
    segments = jnp.pad((positions >= 0).astype(jnp.int32), ((0, 0), (0, pad)))
    if mesh is not None and mesh.size > 1:  # Pallas kernels are not auto-partitioned: split the batch by hand
        from jaxdistill import mesh as mesh_lib

        rows = mesh_lib.batch_sharding(mesh, 2).spec[0]
        spec = jax.sharding.PartitionSpec
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec(rows), spec(rows), spec(rows), spec(rows)),
                            out_specs=spec(rows), check_vma=False)
    return run(q, k, v, segments)[:, :, :, :t]
