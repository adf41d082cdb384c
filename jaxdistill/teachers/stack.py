"""The teacher stack: configured teachers, loaded once, grouped for one vmapped forward each.

A teacher is a model (built-in name, .gguf or HF directory), a prompt style and a weight:
- "chat": the model's chat template with the plain chain-of-thought prompt (the student's
  pCoT) and an optional system message;
- "fewshot": plain completion after worked examples ("Question: ...\\nAnswer:\\n<solution>"),
  for base models such as Gemma 3 270M.
Teachers with the same architecture and vocabulary form a group whose parameters are
stacked on a leading teacher axis (two prompt styles of one model are two teachers of one
group). All teachers decode one shared text in the pivot vocabulary (`align`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import mesh as mesh_lib
from jaxdistill import sampling
from jaxdistill.data.records import Record
from jaxdistill.errors import ConfigError
from jaxdistill.models import load
from jaxdistill.prompts import student_messages, teacher_messages
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import align as align_lib
from jaxdistill.teachers import lockstep

STYLES = ("chat", "fewshot")
FEWSHOT_REPLY_END = "\n\n"  # a blank line closes each worked example, so it is where a few-shot reply ends
FEWSHOT_INSTRUCTION = "Solve each problem step by step. Write the final answer on the last line as '#### <answer>'.\n\n"


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    name: str
    model: str
    style: str = "chat"
    system: str = ""  # chat style: optional system message
    weight: float = 1.0

    @classmethod
    def from_config(cls, c) -> TeacherConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(c) - fields
        if unknown:
            raise ConfigError(f"teacher config has unknown keys {sorted(unknown)}; known: {sorted(fields)}.")
        return cls(**dict(c))


def validate_teachers(teachers: Sequence[TeacherConfig]) -> None:
    """Refuse a bad stack before any model loads."""
    if not teachers:
        raise ConfigError("the teacher stack is empty: configure at least one teacher.")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ConfigError(f"teacher names must be unique, got {names}.")
    for t in teachers:
        if t.style not in STYLES:
            raise ConfigError(f"teacher {t.name!r}: style {t.style!r} is not one of {STYLES}.")
        if not (t.weight >= 0 and np.isfinite(t.weight)):
            raise ConfigError(f"teacher {t.name!r}: weight must be a finite number >= 0, got {t.weight}.")
    if sum(t.weight for t in teachers) <= 0:
        raise ConfigError("at least one teacher needs a weight > 0.")


def fewshot_block(examples: Sequence[Record]) -> str:
    return FEWSHOT_INSTRUCTION + "".join(f"Question: {r.problem}\nAnswer:\n{r.solution}{FEWSHOT_REPLY_END}"
                                         for r in examples)


@dataclasses.dataclass
class Group:
    teachers: list[int]  # indices into the stack's teacher list
    graphdef: object
    state: nnx.State  # stacked: [layers, N_g, ...] per-layer weights, [N_g, ...] the rest
    tokenizer: object
    alignment: align_lib.Alignment


@dataclasses.dataclass
class StackOutput:
    texts: list[str]
    tokens: np.ndarray  # [B, S] pivot token ids
    mask: np.ndarray  # [B, S]
    logprob: np.ndarray  # [B, S] aggregated log-prob of each token
    teacher_logprob: np.ndarray  # [N, B, S] each teacher's log-prob of it (teacher order as configured)
    stats: dict | None  # summed diversity statistics (teacher order as configured); None unless asked
    top_ids: np.ndarray | None = None  # [B, S, K] with record_top=K: the aggregated distribution's top tokens
    top_logprobs: np.ndarray | None = None  # [B, S, K] their aggregated log-probs


class TeacherStack:
    def __init__(self, teachers: Sequence[TeacherConfig], *, pivot: str | None = None, width: int = 2,
                 dtype: str = "float32", mesh=None, loaded: dict | None = None, fewshot: str = "",
                 hint: bool = False, fewshot_ends_turn: bool = False):
        """`pivot`: the model whose vocabulary the stack decodes in (default: the first teacher's).
        `loaded`: already loaded {model: (model, tokenizer)}; `fewshot`: worked examples for
        fewshot-style teachers (`fewshot_block`); `hint`: every teacher also sees the record's
        reference solution (privileged information, as the self-distillation teacher does);
        `fewshot_ends_turn`: a few-shot teacher's probability of ending its reply the way its format
        does (a blank line; a line break after the final-answer line) counts as its probability of
        the pivot's end-of-turn token, which it otherwise hardly gives (`lockstep.reply_end_tokens`)."""
        validate_teachers(teachers)
        self.teachers = list(teachers)
        self.fewshot = fewshot
        self.hint = hint
        loaded = dict(loaded or {})
        for t in teachers:
            if t.model not in loaded:
                try:
                    loaded[t.model] = load(t.model, dtype=dtype)
                except Exception as e:
                    raise ConfigError(f"teacher {t.name!r} cannot load {t.model!r}: {e}") from e
        self.models = loaded
        pivot_name = pivot or teachers[0].model
        if pivot_name not in loaded:
            raise ConfigError(f"pivot {pivot_name!r} is not one of the teachers' models "
                              f"{sorted({t.model for t in teachers})}; name a teacher's model.")
        self.pivot = loaded[pivot_name][1]
        fingerprints = {t.model: hash(tuple(align_lib.token_bytes(loaded[t.model][1]))) for t in teachers}
        by_key: dict[tuple, Group] = {}
        for i, t in enumerate(teachers):
            model, tokenizer = loaded[t.model]
            key = (model.config, fingerprints[t.model])
            if key not in by_key:
                by_key[key] = Group([], None, None, tokenizer, align_lib.align(self.pivot, tokenizer, width=width))
            by_key[key].teachers.append(i)
        self.groups: list[Group] = list(by_key.values())
        for g in self.groups:
            g.graphdef, g.state = _stack([self.models[self.teachers[i].model][0] for i in g.teachers], mesh)
        self.order = [i for g in self.groups for i in g.teachers]  # group order -> configured teacher index
        self.allowed = align_lib.candidates([g.alignment for g in self.groups])
        self.stops = _stop_tables(self.pivot)
        # [N_g] per group: its few-shot teachers, whose replies end with text (None: none, or not asked)
        fewshot = [np.asarray([self.teachers[i].style == "fewshot" for i in g.teachers]) for g in self.groups]
        self.text_ends = [f if fewshot_ends_turn and f.any() else None for f in fewshot]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def prompt(self, i: int, record: Record) -> list[int]:
        teacher = self.teachers[i]
        tokenizer = self.models[teacher.model][1]
        if teacher.style == "fewshot":
            hint = f"Reference solution (a hint):\n{record.solution}\n" if self.hint else ""
            return tokenizer.encode(f"{self.fewshot}Question: {record.problem}\n{hint}Answer:\n")
        system = [{"role": "system", "content": teacher.system}] if teacher.system else []
        return tokenizer.chat(system + (teacher_messages if self.hint else student_messages)(record))

    def weights(self, rows: int, weights: np.ndarray | None = None) -> np.ndarray:
        """[rows, N] weights in configured teacher order (default: the configured weights)."""
        w = np.asarray([t.weight for t in self.teachers], np.float32) if weights is None else np.asarray(weights)
        return np.broadcast_to(w, (rows, len(self.teachers))).astype(np.float32)

    def settings(self, **kw) -> lockstep.Settings:
        """A decode's static settings: this stack's graphs and pivot ids, and `kw`."""
        return lockstep.Settings(graphdefs=tuple(g.graphdef for g in self.groups), pad_id=self.pivot.pad_id,
                                 turn_end=self.pivot.turn_end_id, **kw)

    def run(self, records: Sequence[Record], *, aggregate=None, rule=sampling.Greedy(),
            max_new_tokens: int = 128, top_k: int = 10, weights: np.ndarray | None = None, seed: int = 0,
            forced: Sequence[Sequence[int]] | None = None, record_top: int = 0,
            diversity: bool = False) -> StackOutput:
        """Decode (or, with `forced` pivot token ids per record, score step by step) one batch of
        records. To score given text, `score` is the fast path: one forward instead of a step per
        token (forced decoding stays as its reference and to benchmark the decode step).

        `record_top` > 0 keeps the aggregated distribution's top tokens at every position: a
        sparse multi-teacher target for distillation and for traces. `diversity` sums the
        pairwise diversity statistics into `stats` (None without it).
        """
        n, new = len(records), max_new_tokens if forced is None else max(len(f) for f in forced)
        groups, w, tokens, lengths = self._batch(records, new, top_k, weights, forced or ())
        settings = self.settings(aggregate=aggregate or agg_lib.MeanProbs(), rule=rule, top_k=top_k,
                                 new_slots=tokens.shape[1], cache_steps=tokens.shape[1], forced=forced is not None,
                                 record_top=record_top, diversity=diversity)
        state = lockstep.decode(settings, groups, w, jnp.asarray(self.allowed), self.stops, jax.random.key(seed),
                                jnp.int32(new), (jnp.asarray(tokens), jnp.asarray(lengths)))
        out = self._output(state, n, new, diversity)
        if record_top:
            out.top_ids = np.asarray(state.dist_ids)[:n, :new]
            out.top_logprobs = np.asarray(state.dist_logprobs)[:n, :new]
        return out

    def score(self, records: Sequence[Record], completions: Sequence[Sequence[int]], *, aggregate=None,
              top_k: int = 10, weights: np.ndarray | None = None, record_top: int = 0,
              diversity: bool = False) -> StackOutput:
        """Score pivot-token completions of `records` under the stack, in one forward per group:
        what `run(..., forced=completions)` computes one decode step at a time."""
        n, new = len(records), max(len(c) for c in completions)
        groups, w, tokens, lengths = self._batch(records, new, top_k, weights, completions)
        slots = tokens.shape[1]
        settings = self.settings(aggregate=aggregate or agg_lib.MeanProbs(), rule=sampling.Greedy(), top_k=top_k,
                                 new_slots=slots, cache_steps=slots, record_top=record_top, diversity=diversity)
        out = lockstep.score(settings, groups, w, jnp.asarray(self.allowed), self.stops, jnp.asarray(tokens),
                             jnp.asarray(lengths))
        back = np.argsort(self.order)
        mask = (np.arange(slots)[None] < lengths[:, None])[:n, :new]
        result = StackOutput(
            texts=[self.pivot.decode(list(c)) for c in completions], tokens=tokens[:n, :new], mask=mask,
            logprob=np.asarray(out.logprob)[:n, :new],
            teacher_logprob=np.asarray(out.teacher_logprob)[back][:, :n, :new],
            stats=self._stats(out.stats, back) if diversity else None)
        if record_top:
            result.top_ids = np.asarray(out.dist_ids)[:n, :new]
            result.top_logprobs = np.asarray(out.dist_logprobs)[:n, :new]
        return result

    def _batch(self, records: Sequence[Record], new: int, top_k: int, weights, completions):
        """What `run` and `score` both start from: the groups' prompts for `records` (rows up to the batch
        bucket), the [rows, N] weights in group order, and the given pivot tokens [rows, bucket(new)]
        (pad after each) with their lengths [rows] (0 for rows without any)."""
        if top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: every token), got {top_k}.")
        n = len(records)
        rows = sampling.bucket(n, minimum=1)
        w = self.weights(rows, weights if weights is None or np.ndim(weights) == 1 else
                         np.concatenate([weights, np.ones((rows - n, len(self.teachers)))]))
        tokens, lengths = np.full((rows, sampling.bucket(new)), self.pivot.pad_id, np.int32), np.zeros(rows, np.int32)
        for r, c in enumerate(completions):
            tokens[r, : len(c)], lengths[r] = c, len(c)
        return self.inputs(records, rows=rows, new=new), jnp.asarray(w[:, self.order]), tokens, lengths

    @staticmethod
    def _stats(stats: dict, back: np.ndarray) -> dict:
        """Summed diversity statistics, teachers back in configured order."""
        stats = {k: np.asarray(v) for k, v in stats.items()}
        stats["js"] = stats["js"][back][:, back]
        stats["agree"] = stats["agree"][back][:, back]
        stats["differs"] = stats["differs"][back]
        return stats

    def _output(self, state: lockstep.DecodeState, n: int, new: int, diversity: bool) -> StackOutput:
        """Rows [:n] and tokens [:new] of a decode, teachers back in configured order."""
        back = np.argsort(self.order)
        tokens, mask = np.asarray(state.tokens)[:n, :new], np.asarray(state.mask)[:n, :new]
        stats = self._stats(state.stats, back) if diversity else None
        return StackOutput(
            texts=[self.pivot.decode(row[m].tolist()) for row, m in zip(tokens, mask, strict=True)],
            tokens=tokens, mask=mask, logprob=np.asarray(state.logprob)[:n, :new],
            teacher_logprob=np.asarray(state.teacher_logprob)[back][:, :n, :new], stats=stats)

    def inputs(self, records: Sequence[Record], *, rows: int, new: int, steps: int = 1
               ) -> tuple[lockstep.GroupInputs, ...]:
        """Each group's prompts for `records` (left-padded to `rows` rows), checked against its
        context: prompt + width x `steps` x the bucket of `new` tokens must fit."""
        groups = []
        for g, text_ends in zip(self.groups, self.text_ends, strict=True):
            prompts = [[self.prompt(i, r) for r in records] for i in g.teachers]
            length = sampling.bucket(max(len(p) for ps in prompts for p in ps))
            limit = self.models[self.teachers[g.teachers[0]].model][0].config.max_seq_len
            if length + g.alignment.width * steps * sampling.bucket(new) > limit:
                raise ConfigError(f"prompts of {length} tokens plus {new} new ones (x{steps} levels) exceed the "
                                  f"context of {limit} of teacher {self.teachers[g.teachers[0]].name!r}.")
            padded = [sampling.left_pad(ps, length, rows, g.tokenizer.pad_id) for ps in prompts]
            groups.append(lockstep.GroupInputs(
                state=g.state, tokens=jnp.asarray(np.stack([t for t, _ in padded])),
                mask=jnp.asarray(np.stack([m for _, m in padded])),
                pieces=jnp.asarray(g.alignment.pieces), lengths=jnp.asarray(g.alignment.lengths),
                to_pivot=None if g.alignment.identity else jnp.asarray(g.alignment.to_pivot),
                text_ends=None if text_ends is None else jnp.asarray(text_ends)))
        return tuple(groups)

    def stream(self, i: int, pivot_tokens: Sequence[int]) -> list[int]:
        """Teacher i's own token ids for a committed pivot text (what its KV cache was fed)."""
        group = next(g for g in self.groups if i in g.teachers)
        a = group.alignment
        return [int(t) for c in pivot_tokens for t in a.pieces[c, : a.lengths[c]]]


def _stack(models, mesh):
    """Stack same-architecture models' parameters on a teacher axis (sharded over the `teacher`
    mesh axis when there is a mesh): after the layers axis of per-layer weights, leading elsewhere
    (`decode_state.teacher_axes`). Abstract models (ahead-of-time compiles) stack abstractly."""
    graphdef, first = nnx.split(models[0])
    states = [first] + [nnx.split(m)[1] for m in models[1:]]
    flats = [dict(nnx.to_flat_state(s)) for s in states]
    stacked = []
    for path, variable in nnx.to_flat_state(first):
        at = 1 if path[0] == "layers" else 0
        values = [f[path].get_value() for f in flats]
        axes = list(variable.get_metadata().get("axes") or (None,) * values[0].ndim)
        axes.insert(at, "teacher")
        if isinstance(values[0], jax.ShapeDtypeStruct):
            shape = (*values[0].shape[:at], len(values), *values[0].shape[at:])
            sharding = None if mesh is None else mesh_lib.param_sharding(mesh, axes, shape)
            stacked.append((path, variable.replace(jax.ShapeDtypeStruct(shape, values[0].dtype, sharding=sharding))))
            continue
        value = jnp.stack([jnp.asarray(v) for v in values], axis=at)
        if mesh is not None:
            value = mesh_lib.put_global(np.asarray(value), mesh_lib.param_sharding(mesh, axes, value.shape))
        stacked.append((path, variable.replace(value)))
    return graphdef, nnx.from_flat_state(stacked)


def _stop_tables(pivot) -> lockstep.StopTables:
    """End tokens, and tokens that open or close the final '#### <answer>' line, in the pivot vocabulary."""
    table = align_lib.token_bytes(pivot)
    end = np.zeros(pivot.vocab_size, bool)
    end[list(pivot.eos_ids) + [pivot.turn_end_id]] = True
    text = [b or b"" for b in table]
    marker = np.asarray([b"####" in b for b in text])
    newline = np.asarray([b"\n" in b for b in text])
    blank_line = np.asarray([b.startswith(FEWSHOT_REPLY_END.encode()) for b in text])
    line_break = np.asarray([b.startswith(b"\n") for b in text])
    return lockstep.StopTables(end=jnp.asarray(end), marker=jnp.asarray(marker), newline=jnp.asarray(newline),
                               blank_line=jnp.asarray(blank_line), line_break=jnp.asarray(line_break))
