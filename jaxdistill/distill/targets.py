"""Distillation targets: the teacher/student blend with entropy-matched temperature.

    l_target = (w * l_teacher + l_student) / k

With `temperature=None`, k is solved per position so that H(softmax(l_target)) equals
H(softmax(l_student)). H(softmax(z / k)) rises monotonically with k, from log(#maxima)
at k -> 0 to log(#finite entries) at k -> inf, and its slope is exact and cheap:

    dH / d(log k) = Var_{softmax(z/k)}(z / k)

so a Newton iteration in log k, kept inside a bisection bracket [K_MIN, K_MAX], converges in
a few steps. It runs a fixed number of iterations, so it is vectorised and jit-friendly.

Edge cases, all defined:
- -inf entries (masked vocabulary) have zero probability and add nothing to H.
- Near-deterministic students (H_student ~ 0, or exactly 0 after float underflow): the
  solver returns a k whose target entropy equals H_student to float precision, so the
  target is one-hot on argmax(z) up to rounding.
- An H_student the blend cannot reach (the teacher masks entries the student does not,
  so z has fewer finite entries): k stops at the nearest bound, K_MAX when too little
  entropy is available, K_MIN when too much.
- A row where every entry is -inf yields NaN targets. Such rows are padding; the losses
  mask them out.
Both inputs enter under stop_gradient: the target is a constant for the student's update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

K_MIN, K_MAX = 1e-3, 1e3
NEWTON_STEPS = 24


def entropy(logits: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy (nats) of softmax(logits), safe for -inf entries."""
    logp = jax.nn.log_softmax(logits, axis=axis)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=axis)


def _entropy_and_slope(z: jax.Array, log_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    u = z / jnp.exp(log_k)[..., None]
    logp = jax.nn.log_softmax(u, axis=-1)
    p = jnp.exp(logp)
    finite_u = jnp.where(p > 0, u, 0.0)
    mean_u = jnp.sum(p * finite_u, axis=-1)
    var_u = jnp.sum(p * (finite_u - mean_u[..., None]) ** 2, axis=-1)
    h = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    return h, var_u


def solve_temperature(z: jax.Array, target_entropy: jax.Array) -> jax.Array:
    """k > 0 per row with H(softmax(z / k)) = target_entropy (clipped to [K_MIN, K_MAX])."""
    z = z.astype(jnp.float32)
    lo = jnp.full(z.shape[:-1], jnp.log(K_MIN), jnp.float32)
    hi = jnp.full(z.shape[:-1], jnp.log(K_MAX), jnp.float32)
    log_k = jnp.zeros(z.shape[:-1], jnp.float32)

    def step(_, carry):
        log_k, lo, hi = carry
        h, slope = _entropy_and_slope(z, log_k)
        too_hot = h > target_entropy  # entropy too high: k must shrink
        hi = jnp.where(too_hot, log_k, hi)
        lo = jnp.where(too_hot, lo, log_k)
        newton = log_k + (target_entropy - h) / jnp.maximum(slope, 1e-12)
        inside = (newton > lo) & (newton < hi)
        return jnp.where(inside, newton, 0.5 * (lo + hi)), lo, hi

    log_k, lo, hi = jax.lax.fori_loop(0, NEWTON_STEPS, step, (log_k, lo, hi))
    return jnp.exp(jnp.clip(log_k, jnp.log(K_MIN), jnp.log(K_MAX)))


def blend_logits(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    teacher_weight: float = 0.75,
    temperature: float | None = None,
    *,
    return_temperature: bool = False,
):
    """Target logits (w * teacher + student) / k, same shape as the inputs.

    `temperature=None` matches the target's entropy to the student's per position; a
    float fixes k. With `return_temperature=True`, also returns k per position.
    """
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    student = jax.lax.stop_gradient(student_logits).astype(jnp.float32)
    z = teacher_weight * teacher + student
    if temperature is None:
        k = solve_temperature(z, entropy(student))
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 or None (entropy matching), got {temperature}.")
        k = jnp.full(z.shape[:-1], temperature, jnp.float32)
    target = z / k[..., None]
    return (target, k) if return_temperature else target
