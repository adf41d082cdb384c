"""Distillation losses, masked to generated tokens and computed in sequence chunks.

`token_losses` compares student logits with target logits position by position.
`chunked_distill_loss` goes from hidden states to a summed loss one chunk of positions at
a time. Each chunk's vocabulary projection is rematerialised in the backward pass, so the
float32 [B, T, V] logits of student and teacher are never all live at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdistill.distill.targets import blend_logits, entropy

LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = "forward_kl"  # forward_kl: KL(target || student); reverse_kl: KL(student || target); jsd
    jsd_beta: float = 0.5  # generalized JSD: beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S
    top_k: int = 0  # keep only the target's top-k tokens (renormalised); 0: full vocabulary
    clip: float = 0.0  # cap each token's loss at this value; 0: no cap
    chunk: int = 128  # positions per chunk

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"loss kind {self.kind!r} is not one of {LOSSES}.")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}.")


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities, safe where p = 0."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - jnp.where(p > 0, logq, 0.0)), 0.0), axis=-1)


def truncate_top_k(target_logits: jax.Array, k: int) -> jax.Array:
    """Keep the target's k largest logits, -inf elsewhere (softmax renormalises them)."""
    kth = jax.lax.top_k(target_logits, k)[0][..., -1:]
    return jnp.where(target_logits >= kth, target_logits, -jnp.inf)


def token_losses(student_logits: jax.Array, target_logits: jax.Array, config: LossConfig) -> jax.Array:
    """Per-position loss [...], from student and target logits [..., V]."""
    target_logits = jax.lax.stop_gradient(target_logits)
    if config.top_k:
        target_logits = truncate_top_k(target_logits, config.top_k)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_t = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    if config.kind == "forward_kl":
        loss = _kl(log_t, log_s)
    elif config.kind == "reverse_kl":
        loss = _kl(log_s, log_t)
    else:
        beta = config.jsd_beta
        if beta == 0:
            loss = _kl(log_t, log_s)
        elif beta == 1:
            loss = _kl(log_s, log_t)
        else:
            log_m = jnp.logaddexp(log_t + jnp.log(beta), log_s + jnp.log1p(-beta))
            loss = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    if config.clip:
        loss = jnp.minimum(loss, config.clip)
    return loss


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """How the target is formed from teacher and student logits."""

    kind: str = "blend"  # blend: (w*teacher + student)/k; teacher: the teacher alone
    teacher_weight: float = 0.75
    temperature: float | None = None  # None: entropy-matched k; a float: fixed k

    def __call__(self, teacher_logits, student_logits):
        """Target logits and k (1 for kind="teacher")."""
        if self.kind == "teacher":
            t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
            return t, jnp.ones(t.shape[:-1], jnp.float32)
        if self.kind != "blend":
            raise ValueError(f"target kind {self.kind!r} is not 'blend' or 'teacher'.")
        return blend_logits(teacher_logits, student_logits, self.teacher_weight, self.temperature,
                            return_temperature=True)


def chunked_distill_loss(
    logits_fn: Callable[[jax.Array], jax.Array],
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    mask: jax.Array,
    target: TargetConfig,
    loss: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of masked per-token losses and summed diagnostics, one chunk of positions at a time.

    student_hidden, teacher_hidden: [B, T, D] at the same (aligned) positions; mask [B, T]
    marks the positions whose prediction counts (those predicting generated tokens).
    """
    b, t, d = student_hidden.shape
    chunk = min(loss.chunk, t)
    pad = -t % chunk
    if pad:
        student_hidden = jnp.pad(student_hidden, ((0, 0), (0, pad), (0, 0)))
        teacher_hidden = jnp.pad(teacher_hidden, ((0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x):
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_s, h_t, m):
        student_logits = logits_fn(h_s)
        teacher_logits = jax.lax.stop_gradient(logits_fn(jax.lax.stop_gradient(h_t)))
        target_logits, k = target(teacher_logits, student_logits)
        per_token = token_losses(student_logits, target_logits, loss)
        m = m.astype(jnp.float32)
        stats = {
            "kl_teacher_student": _kl(jax.nn.log_softmax(teacher_logits), jax.nn.log_softmax(student_logits)),
            "entropy_student": entropy(student_logits),
            "entropy_target": entropy(target_logits),
            "temperature": k,
        }
        stats = {name: jnp.sum(jax.lax.stop_gradient(v) * m) for name, v in stats.items()}
        return jnp.sum(jnp.where(m > 0, per_token, 0.0)), stats

    def body(carry, xs):
        total, sums = carry
        value, stats = one_chunk(*xs)
        return (total + value, jax.tree.map(jnp.add, sums, stats)), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("kl_teacher_student", "entropy_student", "entropy_target",
                                                      "temperature")}
    (total, sums), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (split(student_hidden), split(teacher_hidden), split(mask)))
    return total, sums
