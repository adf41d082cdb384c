"""Distillation losses, masked to generated tokens and computed in sequence chunks.

`token_losses` compares student logits with target logits position by position.
`chunked_distill_loss` goes from hidden states to per-token losses one chunk of positions at
a time. Each chunk's vocabulary projection is rematerialised in the backward pass, so the
float32 [B, T, V] logits of student and teacher are never all live at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdistill.distill.targets import blend_logits, entropy
from jaxdistill.sampling import kth_largest

LOSSES = ("forward_kl", "reverse_kl", "jsd", "sampled_reverse_kl")
NORMALIZE = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    # forward_kl: KL(target || student); reverse_kl: KL(student || target); jsd; sampled_reverse_kl: the
    # on-policy distillation form, -A * log p_student(y) with A = log p_target(y) - log p_student(y) of the
    # sampled token y (its expected gradient is reverse KL's, from the sampled token alone)
    kind: str = "forward_kl"
    jsd_beta: float = 0.5  # generalized JSD: beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S
    top_k: int = 0  # keep only the target's top-k tokens (renormalised); 0: full vocabulary
    clip: float = 0.0  # cap each token's loss (sampled_reverse_kl: |A|) at this value; 0: no cap
    end_weight: float = 1.0  # weight of the positions that predict a sample's end token (0 leaves them out)
    normalize: str = "token"  # token: mean over generated tokens; sequence: mean over samples of their token mean
    chunk: int = 128  # positions per chunk

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"loss kind {self.kind!r} is not one of {LOSSES}.")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}.")
        if self.kind == "sampled_reverse_kl" and self.top_k:
            raise ValueError("loss.top_k cannot be used with sampled_reverse_kl: a sampled token outside the "
                             "target's top-k has log p_target = -inf. Use top_k=0.")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"loss.normalize {self.normalize!r} is not one of {NORMALIZE}.")
        if self.end_weight < 0 or self.clip < 0 or self.top_k < 0:
            raise ValueError("loss.end_weight, loss.clip and loss.top_k must be >= 0.")


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities, safe where p = 0."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - jnp.where(p > 0, logq, 0.0)), 0.0), axis=-1)


def truncate_top_k(target_logits: jax.Array, k: int) -> jax.Array:
    """Keep the target's k largest logits, -inf elsewhere (softmax renormalises them)."""
    kth = kth_largest(target_logits, k)
    return jnp.where(target_logits >= kth, target_logits, -jnp.inf)


def pick(logp: jax.Array, labels: jax.Array) -> jax.Array:
    """logp[..., labels]: the log-probability of each position's token."""
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def token_losses(student_logits: jax.Array, target_logits: jax.Array, config: LossConfig,
                 labels: jax.Array | None = None) -> jax.Array:
    """Per-position loss [...], from student and target logits [..., V] (and the sampled tokens
    [...], which sampled_reverse_kl needs)."""
    target_logits = jax.lax.stop_gradient(target_logits)
    if config.top_k:
        target_logits = truncate_top_k(target_logits, config.top_k)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_t = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    if config.kind == "sampled_reverse_kl":
        if labels is None:
            raise ValueError("sampled_reverse_kl needs the sampled tokens (labels).")
        advantage = jax.lax.stop_gradient(pick(log_t, labels) - pick(log_s, labels))
        if config.clip:
            advantage = jnp.clip(advantage, -config.clip, config.clip)
        return -advantage * pick(log_s, labels)
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
    labels: jax.Array,
    target: TargetConfig,
    loss: LossConfig,
) -> dict[str, jax.Array]:
    """Per-token loss and diagnostics [B, T], one chunk of positions at a time.

    student_hidden, teacher_hidden: [B, T, D] at the same (aligned) positions; labels [B, T]:
    the token each position predicts (the sampled completion). Only "loss" carries gradient;
    the caller masks and weights the positions.
    """
    b, t, d = student_hidden.shape
    chunk = min(loss.chunk, t)
    pad = -t % chunk
    if pad:
        student_hidden = jnp.pad(student_hidden, ((0, 0), (0, pad), (0, 0)))
        teacher_hidden = jnp.pad(teacher_hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x):
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_s, h_t, y):
        student_logits = logits_fn(h_s)
        teacher_logits = jax.lax.stop_gradient(logits_fn(jax.lax.stop_gradient(h_t)))
        target_logits, k = target(teacher_logits, student_logits)
        log_s = jax.nn.log_softmax(jax.lax.stop_gradient(student_logits).astype(jnp.float32))
        log_t = jax.nn.log_softmax(target_logits)
        stats = {
            "kl_teacher_student": _kl(jax.nn.log_softmax(teacher_logits), log_s),
            "kl_target_student": _kl(log_t, log_s),
            "entropy_student": entropy(student_logits),
            "entropy_target": entropy(target_logits),
            "temperature": k,
            "logp_student": pick(log_s, y),  # of the token that was sampled
            "logp_target": pick(log_t, y),
        }
        per_token = token_losses(student_logits, target_logits, loss, y)
        if loss.clip:  # the share of tokens the cap reaches (sampled_reverse_kl caps |A|, not the loss)
            capped = (jnp.abs(stats["logp_target"] - stats["logp_student"]) if loss.kind == "sampled_reverse_kl"
                      else per_token)
            stats["clipped"] = (capped >= loss.clip).astype(jnp.float32)
        stats = {name: jax.lax.stop_gradient(v) for name, v in stats.items()}
        return {"loss": per_token, **stats}

    per_chunk = jax.lax.map(lambda xs: one_chunk(*xs), (split(student_hidden), split(teacher_hidden), split(labels)))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], per_chunk)
