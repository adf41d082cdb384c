"""Lockstep decoding of a teacher stack: every teacher, one jitted step per pivot token.

Teachers come in groups: a group is teachers of one architecture and vocabulary whose
parameters are stacked on a leading teacher axis and run by one vmapped forward (with a
mesh, that axis is sharded over the `teacher` mesh axis). Groups of different
architectures or vocabularies all run inside the same `lax.while_loop` body, so there is
no Python loop per token.

Each step: every teacher's next-token log-probs are projected onto the pivot vocabulary
(`align`), restricted to the union of the teachers' top-k candidates and renormalised;
the aggregation rule combines them; the sampler rule picks one pivot token; each group
feeds that token's piece (its own tokens for the same bytes) into its KV cache. The same
loop, fed a fixed continuation instead of sampling (`forced`), scores text under the
stack: that is how diversity is measured and how the stack serves as a distillation
teacher.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

_NEG = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GroupInputs:
    """One group's arrays: stacked parameters, its prompts and its alignment tables."""

    state: nnx.State  # parameters with a leading teacher axis [N_g, ...]
    tokens: jax.Array  # [N_g, B, P] int32 left-padded prompts (each teacher its own prompt)
    mask: jax.Array  # [N_g, B, P] bool
    pieces: jax.Array  # [V_pivot, W] int32: this vocabulary's tokens for each pivot token
    lengths: jax.Array  # [V_pivot] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StopTables:
    end: jax.Array  # [V_pivot] bool: tokens that end the answer at once
    marker: jax.Array  # [V_pivot] bool: tokens holding the final-answer marker ("####")
    newline: jax.Array  # [V_pivot] bool: tokens holding a newline (end the marker line)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static part of a decode (hashable; changing it recompiles)."""

    graphdefs: tuple  # one nnx GraphDef per group
    aggregate: object  # teachers.aggregate rule
    rule: object  # sampling rule over the aggregated log-probs
    top_k: int  # candidates: union of each teacher's top-k (0: every candidate token)
    new_slots: int  # output length bucket
    pad_id: int  # pivot pad id
    forced: bool = False  # score `forced` tokens instead of sampling


def _last_real(hidden, lengths):
    """hidden [N, B, W, D], lengths [B] (>= 1) -> [N, B, D] at each row's last real token."""
    index = jnp.maximum(lengths - 1, 0)[None, :, None, None]
    return jnp.take_along_axis(hidden, jnp.broadcast_to(index, (*hidden.shape[:2], 1, hidden.shape[-1])),
                               axis=2)[:, :, 0]


def _group_logprobs(graphdef, state, hidden, first):
    """[N_g, B, D] hidden -> [N_g, B, V_pivot] teacher log-probs of each pivot token's first piece."""
    def one(s, h):
        return jax.nn.log_softmax(nnx.merge(graphdef, s).logits(h), axis=-1)

    logp = jax.vmap(one)(state, hidden)
    return jnp.take(logp, first, axis=-1)


def candidate_logprobs(per_group, allowed, top_k):
    """Concatenate groups -> [N, B, V], keep allowed tokens in the union of every teacher's
    top-k, and renormalise each teacher over what is kept."""
    logp = jnp.concatenate(per_group, axis=0)
    logp = jnp.where(allowed, logp, _NEG)
    if top_k:
        kth = jax.lax.top_k(logp, top_k)[0][..., -1:]
        keep = jnp.any(logp >= kth, axis=0)  # [B, V]
        logp = jnp.where(keep, logp, _NEG)
    return jax.nn.log_softmax(logp, axis=-1)


def pairwise_stats(logp, live):
    """Diversity of one step's teacher distributions [N, B, V], summed over the live rows [B]:
    Jensen-Shannon divergence [N, N], top-1 agreement [N, N] and the mixture's entropy minus
    the mean member entropy []."""
    p = jnp.exp(logp)
    top = jnp.argmax(logp, axis=-1)  # [N, B]
    agree = jnp.sum((top[:, None] == top[None, :]) & live, axis=-1).astype(jnp.float32)
    mix = 0.5 * (p[:, None] + p[None, :])  # [N, N, B, V]
    log_mix = jnp.log(jnp.maximum(mix, 1e-30))
    kl = lambda a, log_a: jnp.sum(jnp.where(a > 0, a * (log_a - log_mix), 0.0), axis=-1)  # noqa: E731
    js = 0.5 * (kl(p[:, None], logp[:, None]) + kl(p[None, :], logp[None, :]))  # [N, N, B]
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # [N, B]
    p_mix = jnp.mean(p, axis=0)
    mix_entropy = -jnp.sum(jnp.where(p_mix > 0, p_mix * jnp.log(jnp.maximum(p_mix, 1e-30)), 0.0), axis=-1)
    return jnp.sum(js * live, axis=-1), agree, jnp.sum((mix_entropy - jnp.mean(entropy, axis=0)) * live)


@functools.partial(jax.jit, static_argnames=("settings",))
def decode(settings: Settings, groups: tuple[GroupInputs, ...], weights, allowed, stops: StopTables, key,
           max_new, forced):
    """Returns tokens [B, S], mask [B, S], aggregated log-prob of each token [B, S], each
    teacher's (renormalised) log-prob of it [N, B, S], and summed diversity statistics.
    `forced`: (tokens [B, S], lengths [B]) to score instead of sampling (with settings.forced)."""
    batch = weights.shape[0]
    slots = settings.new_slots
    caches, hiddens, positions = [], [], []
    for graphdef, g in zip(settings.graphdefs, groups, strict=True):
        width = g.pieces.shape[1]

        def prefill(s, tokens, mask, graphdef=graphdef, width=width):
            model = nnx.merge(graphdef, s)
            hidden, cache = model.prefill(tokens, mask, slots=tokens.shape[-1] + width * slots)
            return hidden[:, -1], cache

        hidden, cache = jax.vmap(prefill)(g.state, g.tokens, g.mask)
        caches.append(cache)
        hiddens.append(hidden)
        positions.append(jnp.sum(g.mask, axis=-1).astype(jnp.int32))  # [N_g, B]
    teachers = sum(g.tokens.shape[0] for g in groups)

    def step_logprobs(hiddens):
        per_group = [_group_logprobs(gd, g.state, h, g.pieces[:, 0])
                     for gd, g, h in zip(settings.graphdefs, groups, hiddens, strict=True)]
        return candidate_logprobs(per_group, allowed, settings.top_k)

    out = dict(
        tokens=jnp.full((batch, slots), settings.pad_id, jnp.int32),
        mask=jnp.zeros((batch, slots), bool),
        logprob=jnp.zeros((batch, slots), jnp.float32),
        teacher_logprob=jnp.zeros((teachers, batch, slots), jnp.float32),
    )
    stats = dict(js=jnp.zeros((teachers, teachers)), agree=jnp.zeros((teachers, teachers)),
                 entropy_gain=jnp.zeros(()), differs=jnp.zeros((teachers,)), positions=jnp.zeros(()))

    def cond(carry):
        step, done = carry[0], carry[1]
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, done, marked, key, caches, hiddens, positions, out, stats = carry
        key, sub = jax.random.split(key)
        live = ~done
        logp = step_logprobs(hiddens)  # [N, B, V]
        agg = settings.aggregate(logp, weights)
        tok = forced[0][:, step] if settings.forced else settings.rule(agg, sub, step).astype(jnp.int32)
        tok = jnp.where(live, tok, settings.pad_id)
        rows = jnp.arange(batch)
        out = dict(
            tokens=out["tokens"].at[:, step].set(tok),
            mask=out["mask"].at[:, step].set(live),
            logprob=out["logprob"].at[:, step].set(jnp.where(live, agg[rows, tok], 0.0)),
            teacher_logprob=out["teacher_logprob"].at[:, :, step].set(jnp.where(live, logp[:, rows, tok], 0.0)),
        )
        js, agree, gain = pairwise_stats(logp, live)
        differs = jnp.sum((jnp.argmax(agg, -1)[None] != jnp.argmax(logp, -1)) & live[None], axis=-1)
        stats = dict(js=stats["js"] + js, agree=stats["agree"] + agree, entropy_gain=stats["entropy_gain"] + gain,
                     differs=stats["differs"] + differs, positions=stats["positions"] + jnp.sum(live))
        marked = marked | stops.marker[tok]
        if settings.forced:
            done = done | (step + 1 >= forced[1])
        else:
            done = done | stops.end[tok] | (marked & stops.newline[tok] & ~stops.marker[tok])
        new_caches, new_hiddens, new_positions = [], [], []
        for gd, g, cache, pos in zip(settings.graphdefs, groups, caches, positions, strict=True):
            width = g.pieces.shape[1]
            piece, length = g.pieces[tok], jnp.where(live, g.lengths[tok], 0)  # [B, W], [B]
            real = jnp.arange(width)[None] < length[:, None]  # [B, W]

            def feed(s, cache, pos, gd=gd, piece=piece, real=real):
                model = nnx.merge(gd, s)
                hidden, cache = model.hidden_states(piece, pos[:, None] + jnp.arange(piece.shape[1])[None], real,
                                                    cache=cache)
                return hidden, cache

            hidden, cache = jax.vmap(feed)(g.state, cache, pos)
            new_caches.append(cache)
            new_hiddens.append(_last_real(hidden, length))
            new_positions.append(pos + length[None])
        return (step + 1, done, marked, key, new_caches, new_hiddens, new_positions, out, stats)

    done = ~jnp.any(groups[0].mask[0], axis=-1)  # filler rows of the batch bucket start finished
    marked = jnp.zeros((batch,), bool)
    carry = (jnp.int32(0), done, marked, key, caches, hiddens, positions, out, stats)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[7], carry[8]
