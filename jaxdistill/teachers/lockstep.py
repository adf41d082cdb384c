"""Lockstep decoding of a teacher stack: every teacher, one jitted step per pivot token.

Teachers come in groups: a group is teachers of one architecture and vocabulary whose
parameters are stacked on a leading teacher axis and run by one vmapped forward (with a
mesh, that axis is sharded over the `teacher` mesh axis). Groups of different
architectures or vocabularies all run inside the same `lax.while_loop` body, so there is
no Python loop per token.

Each step: every teacher's next-token log-probs are projected onto the pivot vocabulary
(`align`; a few-shot teacher's end of reply onto the end-of-turn token, when asked),
restricted to the union of the teachers' top-k candidates and renormalised; the
aggregation rule combines them; the sampler rule picks one pivot token; each group
feeds that token's piece (its own tokens for the same bytes) into its KV cache. The same
loop, fed a fixed continuation instead of sampling (`forced`), scores text under the
stack: that is how diversity is measured.

Decoding is split into `start` (prefill), `advance` (run until every row has finished or
paused at a branching point) and `fork` (copy rows, KV caches included, so children of a
branch share their prefix without a new prefill); `decode` is start + advance. `score`
computes what `decode` computes for given tokens, in one forward per group instead of one
step per token (diversity on reference texts, the stack as a distillation target).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.models.transformer import KVCache
from jaxdistill.sampling import kth_largest, row_keys
from jaxdistill.teachers.decode_state import CACHE_AXES, DecodeState, GroupInputs, Settings, StopTables, teacher_axes

_NEG = -1e30


def _last_real(hidden, lengths):
    """hidden [N, B, W, D], lengths [B] (>= 1) -> [N, B, D] at each row's last real token."""
    index = jnp.maximum(lengths - 1, 0)[None, :, None, None]
    return jnp.take_along_axis(hidden, jnp.broadcast_to(index, (*hidden.shape[:2], 1, hidden.shape[-1])),
                               axis=2)[:, :, 0]


def _group_logprobs(graphdef, g: GroupInputs, hidden, top_k: int, pivot_size: int, turn_end: int, row_ends):
    """[N_g, B, D] hidden -> [N_g, B, V_pivot] log-probs of the pivot tokens: each teacher token's
    probability goes to the pivot token it proposes (only the teacher's top-k when top_k > 0).
    `row_ends` [B, V_pivot]: the tokens that end a text-ending teacher's reply in each row."""
    def one(s, h):
        return jax.nn.log_softmax(nnx.merge(graphdef, s).logits(h), axis=-1)

    logp = jax.vmap(one, in_axes=(teacher_axes(g.state), 0))(g.state, hidden)
    if g.to_pivot is not None:
        logp = _to_pivot(logp, g.to_pivot, top_k, pivot_size)
    if g.text_ends is not None:
        logp = _end_replies(logp, g.text_ends[:, None, None] & row_ends[None], turn_end)
    return logp


def reply_end_tokens(stops: StopTables, marked):
    """[B, V_pivot]: the tokens that end a few-shot reply, by row: a blank line (it closes a worked
    example), and once the final-answer line is written (`marked` [B]), any line break."""
    return stops.blank_line[None] | (marked[:, None] & stops.line_break[None])


def _end_replies(logp, ends, turn_end: int):
    """A teacher whose reply ends with text rather than an end-of-turn token ends the pivot's turn
    with that text's probability: the tokens in `ends` [N_g, B, V] give theirs to the end token."""
    p = jnp.exp(logp)
    moved = jnp.sum(jnp.where(ends, p, 0.0), axis=-1)
    p = jnp.where(ends, 0.0, p).at[..., turn_end].add(moved)
    return jnp.log(jnp.maximum(p, 1e-10))


def _to_pivot(logp, to_pivot, top_k: int, pivot_size: int):
    """[N_g, B, V_group] -> [N_g, B, V_pivot]: summed over the group tokens proposing each pivot token."""
    if top_k:
        logp, ids = jax.lax.top_k(logp, top_k)
    else:
        ids = jnp.broadcast_to(jnp.arange(logp.shape[-1]), logp.shape)
    target = to_pivot[ids]  # [N_g, B, K]
    probs = jnp.where(target >= 0, jnp.exp(logp), 0.0)
    lead = jnp.arange(logp.shape[0])[:, None, None], jnp.arange(logp.shape[1])[None, :, None]
    summed = jnp.zeros((*logp.shape[:2], pivot_size)).at[lead[0], lead[1], jnp.maximum(target, 0)].add(probs)
    # A token no teacher token proposes gets a floor, not -inf, so a product of experts over
    # teachers with disjoint proposals stays defined.
    return jnp.log(jnp.maximum(summed, 1e-10))


def candidate_logprobs(per_group, allowed, top_k):
    """Concatenate groups -> [N, B, V], keep allowed tokens in the union of every teacher's
    top-k, and renormalise each teacher over what is kept."""
    logp = jnp.concatenate(per_group, axis=0)
    logp = jnp.where(allowed, logp, _NEG)
    if top_k:
        kth = kth_largest(logp, top_k)
        keep = jnp.any(logp >= kth, axis=0)  # [B, V]
        logp = jnp.where(keep, logp, _NEG)
    return jax.nn.log_softmax(logp, axis=-1)


def entropy(logp):
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def pairwise_stats(logp, live):
    """Diversity of one step's teacher distributions [N, B, V], summed over the live rows [B]:
    Jensen-Shannon divergence [N, N], top-1 agreement [N, N] and the mixture's entropy minus
    the mean member entropy []."""
    n = logp.shape[0]
    p = jnp.exp(logp)
    top = jnp.argmax(logp, axis=-1)  # [N, B]
    agree = jnp.sum((top[:, None] == top[None, :]) & live, axis=-1).astype(jnp.float32)
    member_entropy = entropy(logp)  # [N, B]
    # JS(a, b) = H((a + b) / 2) - (H(a) + H(b)) / 2, over the N(N-1)/2 pairs only (the full
    # [N, N, B, V] mixture was most of this function's time)
    first, second = (np.asarray(i, np.int32) for i in np.triu_indices(n, k=1))
    pair_js = entropy(jnp.log(jnp.maximum(0.5 * (p[first] + p[second]), 1e-30))) - 0.5 * (
        member_entropy[first] + member_entropy[second])  # [pairs, B]
    js = jnp.zeros((n, n)).at[first, second].set(jnp.sum(pair_js * live, axis=-1))
    p_mix = jnp.mean(p, axis=0)
    mix_entropy = -jnp.sum(jnp.where(p_mix > 0, p_mix * jnp.log(jnp.maximum(p_mix, 1e-30)), 0.0), axis=-1)
    return js + js.T, agree, jnp.sum((mix_entropy - jnp.mean(member_entropy, axis=0)) * live)


def no_stats(teachers: int) -> dict:
    """Diversity sums before any position (and what a decode without `settings.diversity` keeps)."""
    return dict(js=jnp.zeros((teachers, teachers)), agree=jnp.zeros((teachers, teachers)),
                entropy_gain=jnp.zeros(()), differs=jnp.zeros((teachers,)), positions=jnp.zeros(()))


def diversity_stats(logp, agg, live) -> dict:
    """The diversity sums over the live rows [B] of teacher log-probs [N, B, V] and their aggregate
    [B, V]: `pairwise_stats`, where the aggregate's top token differs from each teacher's, positions."""
    js, agree, gain = pairwise_stats(logp, live)
    differs = jnp.sum((jnp.argmax(agg, -1)[None] != jnp.argmax(logp, -1)) & live[None], axis=-1)
    return dict(js=js, agree=agree, entropy_gain=gain, differs=differs.astype(jnp.float32),
                positions=jnp.sum(live).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("settings",))
def start(settings: Settings, groups: tuple[GroupInputs, ...], key) -> DecodeState:
    """Prefill every teacher's prompt; nothing emitted yet."""
    batch = groups[0].tokens.shape[1]
    slots = settings.new_slots
    caches, hiddens, positions = [], [], []
    for graphdef, g in zip(settings.graphdefs, groups, strict=True):
        width = g.pieces.shape[1]

        def prefill(s, tokens, mask, graphdef=graphdef, width=width):
            model = nnx.merge(graphdef, s)
            hidden, cache = model.prefill(tokens, mask, slots=tokens.shape[-1] + width * settings.cache_steps)
            return hidden[:, -1], cache

        hidden, cache = jax.vmap(prefill, in_axes=(teacher_axes(g.state), 0, 0), out_axes=(0, CACHE_AXES))(
            g.state, g.tokens, g.mask)
        caches.append(cache)
        hiddens.append(hidden)
        positions.append(jnp.sum(g.mask, axis=-1).astype(jnp.int32))  # [N_g, B]
    teachers = sum(g.tokens.shape[0] for g in groups)
    c = settings.proposals
    return DecodeState(
        caches=tuple(caches), hiddens=tuple(hiddens), positions=tuple(positions),
        done=~jnp.any(groups[0].mask[0], axis=-1),  # filler rows of the batch bucket start finished
        marked=jnp.zeros((batch,), bool), paused=jnp.zeros((batch,), bool),
        branch_after=jnp.full((batch,), 0 if settings.branch_entropy > 0 else 2**30, jnp.int32),
        pending=jnp.full((batch,), -1, jnp.int32),
        length=jnp.zeros((batch,), jnp.int32), confidence=jnp.zeros((batch,)), key=key, step=jnp.int32(0),
        tokens=jnp.full((batch, slots), settings.pad_id, jnp.int32), mask=jnp.zeros((batch, slots), bool),
        logprob=jnp.zeros((batch, slots)), teacher_logprob=jnp.zeros((teachers, batch, slots)),
        top_ids=jnp.zeros((teachers + 1, batch, c), jnp.int32), top_logprobs=jnp.zeros((teachers + 1, batch, c)),
        dist_ids=jnp.zeros((batch, slots, max(settings.record_top, 1)), jnp.int32),
        dist_logprobs=jnp.full((batch, slots, max(settings.record_top, 1)), -jnp.inf),
        stats=no_stats(teachers))


@functools.partial(jax.jit, static_argnames=("settings",))
def advance(settings: Settings, groups: tuple[GroupInputs, ...], state: DecodeState, weights, allowed,
            stops: StopTables, max_new, forced) -> DecodeState:
    """Decode until every row is done (end of turn, final answer line, `max_new` tokens) or
    paused at a branching point. `forced`: (tokens [B, S], lengths [B]) to score instead of
    sampling (with settings.forced)."""
    batch = weights.shape[0]
    rows = jnp.arange(batch)

    def cond(s):
        return jnp.any(~s.done & ~s.paused) & (s.step < settings.cache_steps)

    def body(s: DecodeState) -> DecodeState:
        key, sub = jax.random.split(s.key)
        row_ends = reply_end_tokens(stops, s.marked)
        per_group = [_group_logprobs(gd, g, h, settings.top_k, allowed.shape[0], settings.turn_end, row_ends)
                     for gd, g, h in zip(settings.graphdefs, groups, s.hiddens, strict=True)]
        logp = candidate_logprobs(per_group, allowed, settings.top_k)  # [N, B, V]
        agg = settings.aggregate(logp, weights)
        live = ~s.done & ~s.paused
        has_pending = s.pending >= 0
        pause = live & ~has_pending & (s.length >= s.branch_after) & (entropy(agg) > settings.branch_entropy)
        if settings.forced:
            tok = forced[0][rows, s.length]
        else:
            tok = jnp.where(has_pending, s.pending, settings.rule(agg, row_keys(sub, rows), s.step).astype(jnp.int32))
        emit = live & ~pause
        tok = jnp.where(emit, tok, settings.pad_id)

        top_agg = jax.lax.top_k(agg, settings.proposals)
        top_each = jax.lax.top_k(logp, settings.proposals)
        top_ids = jnp.concatenate([top_agg[1][None], top_each[1]], axis=0)
        top_lp = jnp.concatenate([top_agg[0][None], top_each[0]], axis=0)
        at = jnp.where(emit, s.length, 0)
        if settings.record_top:
            dist_lp, dist_ids = jax.lax.top_k(agg, settings.record_top)
            dist_ids = s.dist_ids.at[rows, at].set(jnp.where(emit[:, None], dist_ids, s.dist_ids[rows, at]))
            dist_lp = s.dist_logprobs.at[rows, at].set(jnp.where(emit[:, None], dist_lp, s.dist_logprobs[rows, at]))
        else:
            dist_ids, dist_lp = s.dist_ids, s.dist_logprobs
        stats = jax.tree.map(jnp.add, s.stats, diversity_stats(logp, agg, emit)) if settings.diversity else s.stats

        marked = s.marked | (emit & stops.marker[tok])
        length = s.length + emit
        if settings.forced:
            finished = length >= forced[1]
        else:
            finished = stops.end[tok] | (marked & stops.newline[tok] & ~stops.marker[tok]) | (length >= max_new)
        caches, hiddens, positions = [], [], []
        for gd, g, cache, hidden_old, pos in zip(settings.graphdefs, groups, s.caches, s.hiddens, s.positions,
                                                 strict=True):
            width = g.pieces.shape[1]
            piece, n = g.pieces[tok], jnp.where(emit, g.lengths[tok], 0)  # [B, W], [B]
            real = jnp.arange(width)[None] < n[:, None]  # [B, W]

            def feed(params, cache, pos, gd=gd, piece=piece, real=real):
                model = nnx.merge(gd, params)
                return model.hidden_states(piece, pos[:, None] + jnp.arange(piece.shape[1])[None], real, cache=cache)

            hidden, cache = jax.vmap(feed, in_axes=(teacher_axes(g.state), CACHE_AXES, 0),
                                     out_axes=(0, CACHE_AXES))(g.state, cache, pos)
            caches.append(cache)
            hiddens.append(jnp.where(emit[None, :, None], _last_real(hidden, n), hidden_old))
            positions.append(pos + n[None])
        return DecodeState(
            caches=tuple(caches), hiddens=tuple(hiddens), positions=tuple(positions),
            done=s.done | (emit & finished), marked=marked, paused=s.paused | pause, branch_after=s.branch_after,
            pending=jnp.where(emit, -1, s.pending), length=length,
            confidence=s.confidence + jnp.where(emit, jnp.exp(jnp.max(agg, axis=-1)), 0.0), key=key,
            step=s.step + 1,
            tokens=s.tokens.at[rows, at].set(jnp.where(emit, tok, s.tokens[rows, at])),
            mask=s.mask.at[rows, at].set(s.mask[rows, at] | emit),
            logprob=s.logprob.at[rows, at].set(jnp.where(emit, agg[rows, tok], s.logprob[rows, at])),
            teacher_logprob=s.teacher_logprob.at[:, rows, at].set(
                jnp.where(emit, logp[:, rows, tok], s.teacher_logprob[:, rows, at])),
            top_ids=jnp.where(pause[None, :, None], top_ids, s.top_ids),
            top_logprobs=jnp.where(pause[None, :, None], top_lp, s.top_logprobs), dist_ids=dist_ids,
            dist_logprobs=dist_lp, stats=stats)

    return jax.lax.while_loop(cond, body, state)


@jax.jit
def fork(state: DecodeState, parents, pending, branch_after, active) -> DecodeState:
    """A new batch whose row i continues row `parents[i]` (its KV caches and outputs copied),
    first committing token `pending[i]` (-1: sample as usual); it may pause again once it has
    `branch_after[i]` tokens. Rows with `active[i]` False are filler (finished)."""
    take = lambda x, axis: jnp.take(x, parents, axis=axis)  # noqa: E731
    # vmapped caches: k/v [layers, N_g, B, ...], positions [N_g, B, slots]
    caches = tuple(KVCache(k=take(c.k, 2), v=take(c.v, 2), positions=take(c.positions, 1), index=c.index)
                   for c in state.caches)
    return dataclasses.replace(
        state, caches=caches, hiddens=tuple(take(h, 1) for h in state.hiddens),
        positions=tuple(take(p, 1) for p in state.positions), done=take(state.done, 0) | ~active,
        marked=take(state.marked, 0), paused=jnp.zeros(parents.shape, bool), branch_after=branch_after,
        pending=pending, length=take(state.length, 0), confidence=take(state.confidence, 0),
        tokens=take(state.tokens, 0), mask=take(state.mask, 0), logprob=take(state.logprob, 0),
        teacher_logprob=take(state.teacher_logprob, 1), top_ids=take(state.top_ids, 1),
        top_logprobs=take(state.top_logprobs, 1), dist_ids=take(state.dist_ids, 0),
        dist_logprobs=take(state.dist_logprobs, 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Scores:
    """What `score` returns for tokens [B, S] (positions past a row's length are zeros/-inf)."""

    logprob: jax.Array  # [B, S] aggregated log-prob of each token
    teacher_logprob: jax.Array  # [N, B, S]
    dist_ids: jax.Array  # [B, S, K]: the aggregated top-K at each position (K = max(record_top, 1))
    dist_logprobs: jax.Array  # [B, S, K]
    stats: dict  # summed diversity statistics (zeros unless settings.diversity)


@functools.partial(jax.jit, static_argnames=("settings",))
def score(settings: Settings, groups: tuple[GroupInputs, ...], weights, allowed, stops: StopTables, tokens,
          lengths) -> Scores:
    """Score given pivot tokens [B, S] (row b's first `lengths[b]`) under the stack: what
    `decode` with `forced` tokens computes step by step, in one forward per group. Each
    teacher reads its prompt followed by its own pieces of the tokens (slots a piece does not
    fill are masked out), and predicts pivot token t from its hidden state after the last
    piece of token t - 1."""
    batch, steps = tokens.shape
    live = jnp.arange(steps)[None] < lengths[:, None]  # [B, S]
    marker = stops.marker[tokens] & live
    marked = (jnp.cumsum(marker, axis=1) - marker) > 0  # the final-answer marker came before token t
    row_ends = reply_end_tokens(stops, marked.reshape(-1))
    per_group = []
    for gd, g in zip(settings.graphdefs, groups, strict=True):
        width = g.pieces.shape[1]
        n = jnp.where(live, g.lengths[tokens], 0)  # [B, S]
        real = (jnp.arange(width)[None, None] < n[..., None]).reshape(batch, steps * width)
        pieces = jnp.where(real, g.pieces[tokens].reshape(batch, steps * width), 0)
        prompt_len = g.tokens.shape[-1]
        # the sequence index of the hidden state that predicts each pivot token: the prompt's last
        # token (prompts are left-padded), then the last real piece so far
        index = jnp.where(real, prompt_len + jnp.arange(steps * width)[None], prompt_len - 1)
        index = jax.lax.cummax(index, axis=1)[:, width - 1 :: width]  # after token t
        index = jnp.concatenate([jnp.full((batch, 1), prompt_len - 1), index[:, :-1]], axis=1)  # [B, S]

        def forward(state, prompt, prompt_mask, gd=gd, pieces=pieces, real=real, index=index):
            model = nnx.merge(gd, state)
            hidden, _ = model.hidden_states(jnp.concatenate([prompt, pieces], axis=1),
                                            mask=jnp.concatenate([prompt_mask, real], axis=1))
            return jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, S, D]

        hidden = jax.vmap(forward, in_axes=(teacher_axes(g.state), 0, 0))(g.state, g.tokens, g.mask)
        logp = _group_logprobs(gd, g, hidden.reshape(hidden.shape[0], batch * steps, -1), settings.top_k,
                               allowed.shape[0], settings.turn_end, row_ends)
        per_group.append(logp)
    logp = candidate_logprobs(per_group, allowed, settings.top_k)  # [N, B * S, V]
    agg = settings.aggregate(logp, jnp.repeat(weights, steps, axis=0))
    flat = tokens.reshape(-1)
    rows = jnp.arange(flat.shape[0])
    mask = live.reshape(-1)
    k = max(settings.record_top, 1)
    dist_lp, dist_ids = jax.lax.top_k(agg, k)
    teachers = logp.shape[0]
    stats = diversity_stats(logp, agg, mask) if settings.diversity else no_stats(teachers)
    shape = (batch, steps)
    return Scores(
        logprob=jnp.where(mask, agg[rows, flat], 0.0).reshape(shape),
        teacher_logprob=jnp.where(mask, logp[:, rows, flat], 0.0).reshape(teachers, *shape),
        dist_ids=jnp.where(mask[:, None], dist_ids, 0).reshape(*shape, k),
        dist_logprobs=jnp.where(mask[:, None], dist_lp, -jnp.inf).reshape(*shape, k), stats=stats)


def decode(settings: Settings, groups, weights, allowed, stops, key, max_new, forced) -> DecodeState:
    """Decode every row to its end (no branching)."""
    return advance(settings, groups, start(settings, groups, key), weights, allowed, stops, max_new, forced)
