"""Jitted autoregressive generation with a KV cache.

Prompts are left-padded into a batch; positions count real tokens only, so every row
sees exactly what it would see alone. Batch size, prompt length and the number of new
tokens are rounded up to buckets, so a run compiles a handful of times.

The next-token rule is pluggable: any hashable callable
`rule(logits [B, V] float32, keys [B], step) -> tokens [B] int32`, with one random key per
row (`row_keys`), so a row samples the same whatever it is batched with. `Greedy` and
`Sample` are the standard ones; guided sampling and the multi-teacher aggregator supply
their own. Reported log-probs are the model's own (temperature 1, untruncated).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import mesh as mesh_lib
from jaxdistill.models.transformer import Decoder, KVCache

Rule = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Greedy:
    def __call__(self, logits, keys, step):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Temperature sampling, optionally restricted to the top-k and/or the top-p mass."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")

    def __call__(self, logits, keys, step):
        return jax.vmap(jax.random.categorical)(keys, filter_logits(logits / self.temperature, self.top_k, self.top_p))


def kth_largest(x: jax.Array, k: int) -> jax.Array:
    """The k-th largest value along the last axis, keeping a trailing axis of 1.

    The min of top_k's values, not its last one: XLA:CPU runs top_k as a fast custom call only
    when all of its output is used; slicing out the k-th value turned it into a full sort of the
    vocabulary, ~50x slower (0.3 s per decode step of a 3-teacher stack)."""
    return jnp.min(jax.lax.top_k(x, k)[0], axis=-1, keepdims=True)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set to -inf every logit outside the top-k and outside the smallest top-p mass."""
    if top_k:
        kth = kth_largest(logits, top_k)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, ordered, jnp.inf)  # the first token is always kept
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def rule_from_config(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Rule:
    return Greedy() if temperature == 0 else Sample(temperature, top_k, top_p)


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, N] int32, pad_id after a row stopped
    logprobs: np.ndarray  # [B, N] float32, the model's log-prob of each token
    mask: np.ndarray  # [B, N] bool: generated tokens (the stop token included)

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)

    def sequences(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask, strict=True)]


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two at or above n (and at least `minimum`)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, -len(p):] = p
            mask[i, -len(p):] = True
    return tokens, mask


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rule: Rule = Greedy(),
    rng: jax.Array | int = 0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    share_prompts: bool = True,
    compact_every: int = 16,
) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids).

    With a `mesh`, the rows are split over its batch axes (data x fsdp), so data-parallel
    devices decode different rows; in a multi-process run `prompts` are this process's rows
    and every process calls with the same settings. Random draws do not depend on the
    sharding, so the tokens equal a one-device run's on the same global batch.

    Repeated prompts (several samples of one problem) are prefilled once and their KV-cache
    rows copied (`share_prompts`), across devices on a mesh; the samples are the same as without.

    Finished rows stop costing work: every `compact_every` steps, once the live rows fit a
    batch bucket at most half the current one, they are gathered into it (0: never). Each row
    draws from its own key, so the samples are the same either way.
    """
    if not prompts:
        raise ValueError("generate() needs at least one prompt.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS or a chat template).")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if compact_every < 0:
        raise ValueError(f"compact_every must be >= 0 (0: never compact), got {compact_every}.")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} must be a flat list of token ids (integers), got {ids.dtype} of shape "
                             f"{ids.shape}; encode text with the model's tokenizer first.")
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"prompt {i} holds token id {bad}, outside the model's vocabulary of {vocab} ids; "
                             "was it encoded with another model's tokenizer?")
    longest = max(len(p) for p in prompts)
    limit = model.config.max_seq_len
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}."
        )
    rows, width = bucket(len(prompts), minimum=1), bucket(longest)
    ways = 1  # the global batch splits this many ways
    if mesh is not None:  # every process pads to the same shape; rows split evenly over its devices
        ways = mesh_lib.batch_rows_per_process(mesh)
        rows, width = mesh_lib.process_max([-(-rows // ways) * ways, width])
        ways *= jax.process_count()
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    repeats = len(unique) < len(prompts)
    if mesh is not None:  # one decision for all processes: they run the same program
        repeats = bool(mesh_lib.process_max([int(repeats)])[0])
    expand = None
    if share_prompts and repeats:
        # Repeated prompts (several samples each) are prefilled once. One more row than the
        # unique prompts, so filler rows copy an empty (finished) prompt.
        unique_rows = bucket(len(unique) + 1, minimum=1)
        if mesh is not None:
            local_ways = ways // jax.process_count()
            unique_rows = mesh_lib.process_max([-(-unique_rows // local_ways) * local_ways])[0]
        tokens, mask = left_pad(unique, width, unique_rows, pad_id)
        where = {p: i for i, p in enumerate(unique)}
        expand = np.full((rows,), len(unique), np.int32)
        expand[: len(prompts)] = [where[tuple(p)] for p in prompts]
        if mesh is None:
            tokens, mask, expand = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(expand)
        else:  # the copies may sit on other devices (or processes): index the global prompt rows
            placed = np.concatenate([np.arange(a, b) for a, b in
                                     mesh_lib.local_rows(mesh, unique_rows * jax.process_count())])
            tokens, mask, expand = mesh_lib.host_to_global((tokens, mask, placed[expand].astype(np.int32)), mesh)
    elif mesh is None:
        tokens, mask = (jnp.asarray(x) for x in left_pad(prompts, width, rows, pad_id))
    else:
        tokens, mask = mesh_lib.host_to_global(left_pad(prompts, width, rows, pad_id), mesh)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    graphdef, state = nnx.split(model)
    new_slots = bucket(max_new_tokens)
    decoding, outputs = _prefill_jit(graphdef, state, tokens, mask, expand, new_slots=new_slots, pad_id=int(pad_id),
                                     mesh=mesh)
    settings = dict(rule=rule, eos_ids=tuple(sorted(set(eos_ids))), pad_id=int(pad_id))
    chunk = compact_every or max_new_tokens
    for start in range(0, max_new_tokens, chunk):
        stop = jnp.int32(min(start + chunk, max_new_tokens))
        decoding, outputs = _decode_jit(graphdef, state, decoding, outputs, key, stop, **settings)
        live = int(jnp.sum(~decoding.done))  # the one host sync per chunk
        if live == 0:
            break
        smaller = -(-bucket(live, minimum=1) // ways) * ways
        if compact_every and smaller <= decoding.done.shape[0] // 2:
            decoding = _compact(decoding, smaller)
    n = len(prompts)
    to_host = np.asarray if mesh is None else (lambda x: mesh_lib.global_to_local(x, mesh))  # noqa: E731
    toks, logprobs, gen_mask = (to_host(x)[:n, :max_new_tokens] for x in outputs)
    return Generation(tokens=toks, logprobs=logprobs, mask=gen_mask)


def row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """One key per row: a row's draws depend on its index in the whole batch, not on which rows
    it is decoded with (padding, sharding and compaction leave the samples unchanged)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Decoding:
    """The decode loop's state for the rows still in the batch (compaction drops finished ones)."""

    cache: KVCache
    logits: jax.Array  # [B, V] float32: the next token's
    done: jax.Array  # [B] bool
    positions: jax.Array  # [B] int32: the next token's position
    rows: jax.Array  # [B] int32: each row's index in the output (fillers: one past the end)
    step: jax.Array  # [] int32: new tokens so far


def decoding_shardings(mesh, decoding: Decoding, outputs):
    """Where the decode state lives on a mesh: every per-row array split over the batch axes,
    the KV cache [layers, B, kv_heads, slots, head_dim] also over `tensor` by its heads."""
    rows = lambda x: mesh_lib.batch_sharding(mesh, x.ndim)  # noqa: E731
    cache_spec = mesh_lib.logical_to_spec(("layers", "batch", "kv_heads", "length", "head_dim"),
                                          decoding.cache.k.shape, mesh)
    cache = KVCache(k=jax.sharding.NamedSharding(mesh, cache_spec), v=jax.sharding.NamedSharding(mesh, cache_spec),
                    positions=rows(decoding.cache.positions),
                    index=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    placed = Decoding(cache, rows(decoding.logits), rows(decoding.done), rows(decoding.positions),
                      rows(decoding.rows), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return placed, jax.tree.map(rows, outputs)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_slots", "pad_id", "mesh"))
def _prefill_jit(graphdef, state, tokens, mask, expand, *, new_slots, pad_id, mesh=None):
    """Prefill the left-padded prompts; the decode state and empty outputs [B, new_slots], made
    in `decoding_shardings` on a mesh (no device holds the whole cache).

    `expand` [B]: the rows are copies of these prompt rows (prefix sharing): each prompt is
    prefilled once and its KV-cache row copied to every row that continues it.
    """
    model = nnx.merge(graphdef, state)
    prompt_len = tokens.shape[1]
    hidden, cache = model.prefill(tokens, mask, slots=prompt_len + new_slots)
    logits = model.logits(hidden[:, -1])
    positions = mask.sum(axis=-1).astype(jnp.int32)
    done = ~mask.any(axis=-1)  # filler rows of the batch bucket start finished
    if expand is not None:
        cache = _take_rows(cache, expand)
        logits, positions, done = (jnp.take(x, expand, axis=0) for x in (logits, positions, done))
    batch = logits.shape[0]
    outputs = (jnp.full((batch, new_slots), pad_id, jnp.int32), jnp.zeros((batch, new_slots), jnp.float32),
               jnp.zeros((batch, new_slots), bool))
    decoding = Decoding(cache, logits, done, positions, jnp.arange(batch, dtype=jnp.int32), jnp.int32(0))
    if mesh is not None:
        decoding, outputs = jax.lax.with_sharding_constraint((decoding, outputs),
                                                             decoding_shardings(mesh, decoding, outputs))
    return decoding, outputs


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "eos_ids", "pad_id"), donate_argnames=("decoding",
                                                                                                        "outputs"))
def _decode_jit(graphdef, state, decoding, outputs, key, stop, *, rule, eos_ids, pad_id):
    model = nnx.merge(graphdef, state)
    return decode_loop(model, decoding, outputs, key, stop, rule=rule, eos_ids=eos_ids, pad_id=pad_id)


def decode_loop(model: Decoder, decoding: Decoding, outputs, key, stop, *, rule: Rule,
                eos_ids: tuple[int, ...], pad_id: int):
    """Sample token by token until step `stop` or until every row is done (traceable); each
    row's token, log-prob and mask land in `outputs` at its own output row."""
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(carry):
        d = carry[0]
        return (d.step < stop) & ~jnp.all(d.done)

    def body(carry):
        d, (out_tokens, out_logprobs, out_mask) = carry
        live = ~d.done
        keys = row_keys(jax.random.fold_in(key, d.step), d.rows)
        tok = jnp.where(live, rule(d.logits, keys, d.step).astype(jnp.int32), pad_id)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(d.logits), tok[:, None], axis=-1)[:, 0]
        # Fillers (row index past the end) are dropped; a finished row rewrites its own padding.
        out_tokens = out_tokens.at[d.rows, d.step].set(tok, mode="drop")
        out_logprobs = out_logprobs.at[d.rows, d.step].set(jnp.where(live, logprob, 0.0), mode="drop")
        out_mask = out_mask.at[d.rows, d.step].set(live, mode="drop")
        hidden, cache = model.hidden_states(tok[:, None], d.positions[:, None], live[:, None], cache=d.cache)
        d = Decoding(cache, model.logits(hidden[:, -1]), d.done | jnp.isin(tok, eos), d.positions + 1, d.rows,
                     d.step + 1)
        return d, (out_tokens, out_logprobs, out_mask)

    return jax.lax.while_loop(cond, body, (decoding, outputs))


def _take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    return KVCache(k=jnp.take(cache.k, rows, axis=1), v=jnp.take(cache.v, rows, axis=1),
                   positions=jnp.take(cache.positions, rows, axis=0), index=cache.index)


def _compact(decoding: Decoding, rows: int) -> Decoding:
    """The live rows, in order, in a batch of `rows` (the rest are finished fillers), laid out
    over the devices as the full batch was."""
    shardings = jax.tree.map(lambda x: x.sharding, decoding)
    return jax.jit(_gather_live, static_argnums=1, out_shardings=shardings)(decoding, rows)


def _gather_live(decoding: Decoding, rows: int) -> Decoding:
    order = jnp.argsort(decoding.done, stable=True)[:rows]  # live rows first, in their order
    filler = decoding.done[order]
    d = jax.tree.map(lambda x: jnp.take(x, order, axis=0), dataclasses.replace(decoding, cache=None, step=None))
    end = jnp.int32(jnp.iinfo(jnp.int32).max)
    return Decoding(_take_rows(decoding.cache, order), d.logits, d.done, d.positions,
                    jnp.where(filler, end, d.rows), decoding.step)


def chat(
    model: Decoder,
    tokenizer,
    conversations: Sequence[Sequence[dict]] | Sequence[dict] | str,
    *,
    max_new_tokens: int = 128,
    rule: Rule = Greedy(),
    rng: jax.Array | int = 0,
) -> list[str]:
    """Reply to one or more conversations (or a bare user message) with the chat template."""
    if isinstance(conversations, str):
        conversations = [[{"role": "user", "content": conversations}]]
    elif conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    prompts = [tokenizer.chat(messages) for messages in conversations]
    out = generate(model, prompts, max_new_tokens=max_new_tokens, rule=rule, rng=rng,
                   eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    return [tokenizer.decode(seq) for seq in out.sequences()]
