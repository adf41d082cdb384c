"""Distillation targets: the teacher/student blend with entropy-matched temperature.

    l_target = (w * l_teacher + l_student) / k

With `temperature=None`, k is solved per position so that H(softmax(l_target)) equals
H(softmax(l_student)). H(softmax(z / k)) rises monotonically with k, from log(#maxima)
at k -> 0 to log(#finite entries) at k -> inf, and its slope is exact and cheap:

    dH / d(log k) = Var_{softmax(z/k)}(z / k)

so a Newton iteration in log k, kept inside a bisection bracket [K_MIN, K_MAX], converges in
a few steps. All rows iterate together inside jit (a while_loop) until every row's entropy
is within TOLERANCE nats of its goal or its bracket has closed, at most MAX_STEPS times.
Each step costs one exp per entry: z is shifted so its maximum is 0, and H and the
variance come from the sums of e, e*u and e*u^2 with e = exp(u), u = z/k.

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
TOLERANCE = 1e-6  # nats
MAX_STEPS = 30


def entropy(logits: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy (nats) of softmax(logits), safe for -inf entries."""
    logp = jax.nn.log_softmax(logits, axis=axis)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=axis)


def _entropy_and_slope(shifted: jax.Array, finite: jax.Array, log_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """H(softmax(z / k)) and dH/d(log k) = Var(z / k); `shifted` is z - max(z), so exp never overflows."""
    u = jnp.where(finite, shifted * jnp.exp(-log_k)[..., None], 0.0)
    e = jnp.where(finite, jnp.exp(u), 0.0)
    total = jnp.sum(e, axis=-1)  # >= 1: the maximum contributes exp(0)
    mean = jnp.sum(e * u, axis=-1) / total
    second = jnp.sum(e * u * u, axis=-1) / total
    return jnp.log(total) - mean, jnp.maximum(second - mean * mean, 0.0)


def solve_temperature(z: jax.Array, target_entropy: jax.Array) -> jax.Array:
    """k > 0 per row with H(softmax(z / k)) = target_entropy (clipped to [K_MIN, K_MAX])."""
    z = z.astype(jnp.float32)
    finite = jnp.isfinite(z)
    shifted = jnp.where(finite, z - jnp.max(z, axis=-1, keepdims=True), 0.0)
    lo = jnp.full(z.shape[:-1], jnp.log(K_MIN), jnp.float32)
    hi = jnp.full(z.shape[:-1], jnp.log(K_MAX), jnp.float32)

    def unfinished(carry):
        step, _, lo, hi, error = carry
        return (step < MAX_STEPS) & jnp.any((error > TOLERANCE) & (hi - lo > 1e-6))

    def newton(carry):
        step, log_k, lo, hi, _ = carry
        h, slope = _entropy_and_slope(shifted, finite, log_k)
        too_hot = h > target_entropy  # entropy too high: k must shrink
        hi = jnp.where(too_hot, log_k, hi)
        lo = jnp.where(too_hot, lo, log_k)
        proposal = log_k + (target_entropy - h) / jnp.maximum(slope, 1e-12)
        inside = (proposal > lo) & (proposal < hi)
        error = jnp.abs(h - target_entropy)
        # A row already within tolerance keeps its k; the others take a Newton or bisection step.
        next_k = jnp.where(error <= TOLERANCE, log_k, jnp.where(inside, proposal, 0.5 * (lo + hi)))
        return step + 1, next_k, lo, hi, error

    start = (jnp.zeros((), jnp.int32), jnp.zeros(z.shape[:-1], jnp.float32), lo, hi,
             jnp.full(z.shape[:-1], jnp.inf, jnp.float32))
    _, log_k, *_ = jax.lax.while_loop(unfinished, newton, start)
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
