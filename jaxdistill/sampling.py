"""Jitted autoregressive generation with a KV cache.

Prompts are left-padded into a batch; positions count real tokens only, so every row
sees exactly what it would see alone. Batch size, prompt length and the number of new
tokens are rounded up to buckets, so a run compiles a handful of times.

The next-token rule is pluggable: any hashable callable
`rule(logits [B, V] float32, key, step) -> tokens [B] int32`. `Greedy` and `Sample`
are the standard ones; guided sampling and the multi-teacher aggregator supply their
own. Reported log-probs are the model's own (temperature 1, untruncated).
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
    def __call__(self, logits, key, step):
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

    def __call__(self, logits, key, step):
        return jax.random.categorical(key, filter_logits(logits / self.temperature, self.top_k, self.top_p))


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
) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids).

    With a `mesh`, the rows are split over its batch axes (data x fsdp), so data-parallel
    devices decode different rows; in a multi-process run `prompts` are this process's rows
    and every process calls with the same settings. Random draws do not depend on the
    sharding, so the tokens equal a one-device run's on the same global batch.

    Repeated prompts (several samples of one problem) are prefilled once and their KV-cache
    rows copied (`share_prompts`; without a mesh); the samples are the same as without.
    """
    if not prompts:
        raise ValueError("generate() needs at least one prompt.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS or a chat template).")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
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
    if mesh is not None:  # every process pads to the same shape; rows split evenly over its devices
        ways = mesh_lib.batch_rows_per_process(mesh)
        rows, width = mesh_lib.process_max([-(-rows // ways) * ways, width])
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    expand = None
    if share_prompts and mesh is None and len(unique) < len(prompts):
        # Repeated prompts (several samples each) are prefilled once. One more row than the
        # unique prompts, so filler rows copy an empty (finished) prompt.
        tokens, mask = left_pad(unique, width, bucket(len(unique) + 1, minimum=1), pad_id)
        where = {p: i for i, p in enumerate(unique)}
        expand = np.full((rows,), len(unique), np.int32)
        expand[: len(prompts)] = [where[tuple(p)] for p in prompts]
        tokens, mask, expand = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(expand)
    elif mesh is None:
        tokens, mask = (jnp.asarray(x) for x in left_pad(prompts, width, rows, pad_id))
    else:
        tokens, mask = mesh_lib.host_to_global(left_pad(prompts, width, rows, pad_id), mesh)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    graphdef, state = nnx.split(model)
    out = _generate_jit(
        graphdef, state, tokens, mask, key, jnp.int32(max_new_tokens), expand,
        new_slots=bucket(max_new_tokens), rule=rule, eos_ids=tuple(sorted(set(eos_ids))), pad_id=int(pad_id),
    )
    n = len(prompts)
    to_host = np.asarray if mesh is None else (lambda x: mesh_lib.global_to_local(x, mesh))  # noqa: E731
    toks, logprobs, gen_mask = (to_host(x)[:n, :max_new_tokens] for x in out)
    return Generation(tokens=toks, logprobs=logprobs, mask=gen_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_slots", "rule", "eos_ids", "pad_id"))
def _generate_jit(graphdef, state, tokens, mask, key, max_new, expand, *, new_slots, rule, eos_ids, pad_id):
    model = nnx.merge(graphdef, state)
    return decode_loop(model, tokens, mask, key, max_new, new_slots=new_slots, rule=rule, eos_ids=eos_ids,
                       pad_id=pad_id, expand=expand)


def decode_loop(model: Decoder, tokens, mask, key, max_new, *, new_slots: int, rule: Rule,
                eos_ids: tuple[int, ...], pad_id: int, expand=None):
    """Prefill the left-padded prompts, then sample token by token (traceable).

    `expand` [B]: the rows are copies of these prompt rows (prefix sharing): each prompt is
    prefilled once and its KV-cache row copied to every row that continues it.
    """
    prompt_len = tokens.shape[1]
    hidden, cache = model.prefill(tokens, mask, slots=prompt_len + new_slots)
    logits = model.logits(hidden[:, -1])
    next_pos = mask.sum(axis=-1).astype(jnp.int32)
    done = ~mask.any(axis=-1)  # filler rows of the batch bucket start finished
    if expand is not None:
        cache = KVCache(k=jnp.take(cache.k, expand, axis=1), v=jnp.take(cache.v, expand, axis=1),
                        positions=jnp.take(cache.positions, expand, axis=0), index=cache.index)
        logits, next_pos, done = (jnp.take(x, expand, axis=0) for x in (logits, next_pos, done))
    batch = logits.shape[0]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    out_tokens = jnp.full((batch, new_slots), pad_id, jnp.int32)
    out_logprobs = jnp.zeros((batch, new_slots), jnp.float32)
    out_mask = jnp.zeros((batch, new_slots), bool)

    def cond(carry):
        step, done = carry[0], carry[3]
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, done, pos, key, out_tokens, out_logprobs, out_mask = carry
        key, sub = jax.random.split(key)
        live = ~done
        tok = jnp.where(live, rule(logits, sub, step).astype(jnp.int32), pad_id)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
        out_tokens = out_tokens.at[:, step].set(tok)
        out_logprobs = out_logprobs.at[:, step].set(jnp.where(live, logprob, 0.0))
        out_mask = out_mask.at[:, step].set(live)
        done = done | jnp.isin(tok, eos)
        hidden, cache = model.hidden_states(tok[:, None], pos[:, None], live[:, None], cache=cache)
        logits = model.logits(hidden[:, -1])
        return step + 1, cache, logits, done, pos + 1, key, out_tokens, out_logprobs, out_mask

    carry = (jnp.int32(0), cache, logits, done, next_pos, key, out_tokens, out_logprobs, out_mask)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[6], carry[7], carry[8]


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
