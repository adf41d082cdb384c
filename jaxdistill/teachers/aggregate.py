"""Aggregation rules: many teachers' next-token log-probs -> one distribution.

Every rule is a frozen dataclass `rule(logp [N, B, V], weights [B, N]) -> log-probs [B, V]`
(normalised, -inf where a token is impossible). `logp` holds each teacher's log-softmax
over one shared vocabulary (for teachers with other vocabularies, after `align` projected
them onto the pivot vocabulary). When the teacher axis is sharded over a `teacher` mesh
axis, the sums over axis 0 become reductions across that mesh axis under jit.

Weights are data, not configuration: fixed per teacher, per prompt from each teacher's
perplexity on it (`perplexity_weights`), or online from verified accuracy (`OnlineWeights`),
so changing them never recompiles the decoder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _log_weights(weights: jax.Array) -> jax.Array:
    """[B, N] non-negative weights -> [N, B, 1] log of the normalised weights."""
    w = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.log(w).T[..., None]


@dataclasses.dataclass(frozen=True)
class MeanProbs:
    """The weighted mixture sum_j w_j p_j (a teacher may propose what others rule out)."""

    def __call__(self, logp, weights):
        return jax.nn.logsumexp(logp + _log_weights(weights), axis=0)


@dataclasses.dataclass(frozen=True)
class MeanLogProbs:
    """Product of experts: softmax(sum_j w_j log p_j); a token survives only if every teacher allows it."""

    def __call__(self, logp, weights):
        w = jnp.exp(_log_weights(weights))
        # 0 * -inf is nan: a teacher with zero weight must not veto anything.
        summed = jnp.sum(jnp.where(w > 0, w * logp, 0.0), axis=0)
        return jax.nn.log_softmax(summed, axis=-1)


@dataclasses.dataclass(frozen=True)
class Gated:
    """The lead teacher alone while it is confident (top probability >= threshold), else `inner`."""

    threshold: float = 0.5
    lead: int = 0
    inner: MeanProbs | MeanLogProbs = MeanProbs()

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"the gate threshold must be in (0, 1], got {self.threshold}.")

    def __call__(self, logp, weights):
        lead = logp[self.lead]
        confident = jnp.max(lead, axis=-1, keepdims=True) >= jnp.log(self.threshold)
        return jnp.where(confident, lead, self.inner(logp, weights))


RULES = {"mean_probs": MeanProbs, "mean_logprobs": MeanLogProbs, "gated": Gated}


def rule_from_config(name: str, *, threshold: float = 0.5, lead: int = 0, inner: str = "mean_probs"):
    if name not in RULES:
        raise ValueError(f"aggregation rule {name!r} is not one of {sorted(RULES)}.")
    if name == "gated":
        if inner not in ("mean_probs", "mean_logprobs"):
            raise ValueError(f"the gated rule's inner rule must be mean_probs or mean_logprobs, got {inner!r}.")
        return Gated(threshold=threshold, lead=lead, inner=RULES[inner]())
    return RULES[name]()


def perplexity_weights(mean_nll: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per-prompt weights from each teacher's mean negative log-likelihood [B, N] of the prompt:
    w ∝ exp(-nll / temperature); at temperature 1 that is w ∝ 1 / perplexity."""
    if temperature <= 0:
        raise ValueError(f"the perplexity-weight temperature must be > 0, got {temperature}.")
    logits = -np.asarray(mean_nll, np.float64) / temperature
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass
class OnlineWeights:
    """Weights from each teacher's verified accuracy so far (Beta(1, 1) prior), sharpened by
    `temperature`: w_j ∝ exp(accuracy_j / temperature). Update after each verified batch."""

    teachers: int
    temperature: float = 0.1
    correct: np.ndarray = None
    seen: np.ndarray = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"the online-weight temperature must be > 0, got {self.temperature}.")
        self.correct = np.zeros(self.teachers) if self.correct is None else np.asarray(self.correct, float)
        self.seen = np.zeros(self.teachers) if self.seen is None else np.asarray(self.seen, float)

    @property
    def accuracy(self) -> np.ndarray:
        return (self.correct + 1) / (self.seen + 2)

    def update(self, correct: np.ndarray) -> None:
        """`correct` [N] or [B, N]: whether each teacher's own answer was verified correct."""
        correct = np.atleast_2d(np.asarray(correct, float))
        self.correct += correct.sum(axis=0)
        self.seen += correct.shape[0]

    def __call__(self) -> np.ndarray:
        z = self.accuracy / self.temperature
        w = np.exp(z - z.max())
        return (w / w.sum()).astype(np.float32)
