"""What a lockstep decode of the teacher stack works on: each group's inputs (stacked parameters,
prompts, alignment tables), the pivot vocabulary's stop tables, the static settings (changing
them recompiles) and the decode state that `lockstep.start`, `advance` and `fork` carry; and
where the teacher axis sits in a group's stacked parameters and KV caches."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxdistill.models.transformer import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GroupInputs:
    """One group's arrays: stacked parameters, its prompts and its alignment tables."""

    state: nnx.State  # parameters stacked over the group's teachers (axes: `teacher_axes`)
    tokens: jax.Array  # [N_g, B, P] int32 left-padded prompts (each teacher its own prompt)
    mask: jax.Array  # [N_g, B, P] bool
    pieces: jax.Array  # [V_pivot, W] int32: this vocabulary's tokens for each pivot token
    lengths: jax.Array  # [V_pivot] int32
    to_pivot: jax.Array | None  # [V_group] int32: the pivot token each token proposes; None: same vocabulary
    # [N_g] bool: teachers whose replies end with text, not an end token (few-shot: a blank line, or
    # a newline after the final-answer line); None: no such teacher, or not asked for
    text_ends: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StopTables:
    end: jax.Array  # [V_pivot] bool: tokens that end the answer at once
    marker: jax.Array  # [V_pivot] bool: tokens holding the final-answer marker ("####")
    newline: jax.Array  # [V_pivot] bool: tokens holding a newline (end the marker line)
    blank_line: jax.Array  # [V_pivot] bool: tokens that start with a blank line
    line_break: jax.Array  # [V_pivot] bool: tokens that start with a newline


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static part of a decode (hashable; changing it recompiles)."""

    graphdefs: tuple  # one nnx GraphDef per group
    aggregate: object  # teachers.aggregate rule
    rule: object  # sampling rule over the aggregated log-probs
    top_k: int  # candidates: union of each teacher's top-k (0: every candidate token)
    new_slots: int  # output length bucket
    cache_steps: int  # decode steps the KV caches have room for (>= new_slots; more when branching)
    pad_id: int  # pivot pad id
    turn_end: int  # pivot end-of-turn id: where a text-ending teacher's end-of-reply probability goes
    forced: bool = False  # score `forced` tokens instead of sampling
    branch_entropy: float = 0.0  # > 0: rows pause where the aggregated entropy (nats) exceeds this
    proposals: int = 4  # top tokens of the stack and of each teacher recorded at a pause
    record_top: int = 0  # > 0: keep the aggregated distribution's top tokens at every emitted position
    diversity: bool = False  # sum the pairwise diversity statistics (JS, agreement: an [N, N, B, V] cost)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    caches: tuple  # per group, KVCache with leading teacher axis
    hiddens: tuple  # per group [N_g, B, D]: hidden state that predicts the next token
    positions: tuple  # per group [N_g, B]: next position in each teacher's stream
    done: jax.Array  # [B]
    marked: jax.Array  # [B]: the final-answer marker has been written
    paused: jax.Array  # [B]: stopped at a branching point, waiting for `fork`
    branch_after: jax.Array  # [B] int32: the row may pause once it has emitted this many tokens
    pending: jax.Array  # [B] int32: a token to commit next instead of sampling (-1: none)
    length: jax.Array  # [B] int32: tokens emitted so far
    confidence: jax.Array  # [B]: summed aggregated top probability of the emitted tokens
    key: jax.Array
    step: jax.Array  # [] int32: loop steps so far (KV-cache slots used per group, over width)
    tokens: jax.Array  # [B, S]
    mask: jax.Array  # [B, S]
    logprob: jax.Array  # [B, S]: aggregated log-prob of each emitted token
    teacher_logprob: jax.Array  # [N, B, S]
    top_ids: jax.Array  # [N + 1, B, C]: at the last pause, the stack's (row 0) and each teacher's top tokens
    top_logprobs: jax.Array  # [N + 1, B, C]
    dist_ids: jax.Array  # [B, S, K]: the aggregated top-K at each emitted position (K = max(record_top, 1))
    dist_logprobs: jax.Array  # [B, S, K]
    stats: dict  # summed diversity statistics over emitted positions (zeros unless settings.diversity)


# Where the teacher axis sits in a group's stacked arrays. Per-layer weights and KV caches keep
# their layers axis first ([layers, N_g, ...]) so the layer scan inside the vmapped forward
# slices them in place; with the teacher axis first, XLA copied every weight and the whole cache
# into [layers, N_g, ...] order on every decode step. The write index is shared by the group
# (its teachers advance together); a per-teacher index made every cache write a transposing scatter.
CACHE_AXES = KVCache(k=1, v=1, positions=0, index=None)


def is_layer_weight(path) -> bool:
    return getattr(path[0], "key", None) == "layers"


def teacher_axes(state):
    """vmap in_axes of a stacked state: 1 for per-layer weights, 0 for the rest."""
    return jax.tree_util.tree_map_with_path(lambda path, _: 1 if is_layer_weight(path) else 0, state)
