"""Branch search over the stack's continuations: right and wrong directions, pruning, gold traces.

From a prompt the stack decodes with its aggregated rule. Where the aggregated entropy
exceeds `branch_entropy`, the branch pauses and expands into up to `right` children (the
stack's top tokens) and `wrong` children (tokens some teacher ranks in its top few but the
stack does not: plausible to a member, disfavoured by the consensus). Children copy their
parent's KV caches (no new prefill) and all live branches decode as one batch. Pruning
keeps at most `max_live` branches, the most confident first (mean top probability of the
stack along the branch), drops those below `min_confidence` (a branch that has not written a
token yet has no confidence to judge and is kept), and stops expanding once the
prompt's `token_budget` is spent. A branch ends at the end of its turn, after its final
answer line, or at `max_new_tokens`.

Leaves are verified against the exact answer: verified leaves are gold traces; every other
finished leaf is a negative, located at the first token where it left the gold trace that
shares its longest prefix (what it wrote there, what the gold trace wrote, and what each
teacher proposed there when that point was a branching point).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import sampling
from jaxdistill.data.records import Record, answer_matches
from jaxdistill.errors import ConfigError
from jaxdistill.teachers import lockstep
from jaxdistill.teachers.stack import TeacherStack

_NEVER = 2**30


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    right: int = 2  # R: consensus children per branching point
    wrong: int = 2  # W: wrong-direction children per branching point
    branch_entropy: float = 1.0  # nats of the aggregated distribution that make a branching point
    gap: int = 6  # tokens a child decodes before it may branch again
    max_levels: int = 3  # branching points on one path
    max_live: int = 16  # branches decoding at once
    min_confidence: float = 0.0  # prune a branch whose mean top probability falls below this
    token_budget: int = 1024  # generated tokens per prompt, over all branches
    max_new_tokens: int = 96  # per branch

    def __post_init__(self):
        if self.right < 1 or self.wrong < 0:
            raise ConfigError(f"search needs right >= 1 and wrong >= 0, got right={self.right}, wrong={self.wrong}.")
        if self.max_live < self.right + self.wrong:
            raise ConfigError(f"max_live ({self.max_live}) must hold one expansion (right + wrong = "
                              f"{self.right + self.wrong}).")
        if self.token_budget < self.max_new_tokens:
            raise ConfigError(f"token_budget ({self.token_budget}) is smaller than one rollout "
                              f"(max_new_tokens {self.max_new_tokens}).")
        if self.branch_entropy <= 0 or self.gap < 1 or self.max_levels < 0 or self.max_new_tokens < 1:
            raise ConfigError("branch_entropy must be > 0, gap >= 1, max_levels >= 0 and max_new_tokens >= 1.")


@dataclasses.dataclass
class Branch:
    id: int
    parent: int
    kind: str  # "root", "right" or "wrong"
    level: int  # branching points on its path
    position: int  # the token index where it left its parent (0 for the root)
    proposals: dict | None = None  # at that point: the stack's and each teacher's top tokens
    proposer: str = ""  # wrong direction: the teacher that ranked the token highest
    length: int = -1  # tokens on its path where it last paused, ended or was cut
    features: dict | None = None  # at its last pause: what a pruning policy sees (see `pause_features`)


@dataclasses.dataclass
class SearchResult:
    record: Record
    leaves: list[dict]  # every finished branch: text, tokens, correct, kind path, confidence
    branches: list[Branch]
    tokens: int  # generated tokens, prefixes counted once
    pruned: int

    @property
    def gold(self) -> list[dict]:
        return [leaf for leaf in self.leaves if leaf["correct"]]


def _children(top_ids, top_lp, config: SearchConfig, names: list[str], pivot) -> list[tuple[int, str, str]]:
    """(token, kind, proposer) for one paused row: top_ids/top_lp [N + 1, C], row 0 the stack."""
    right = [int(t) for t in top_ids[0, : config.right]]
    wrong, seen = [], set(right)
    order = np.argsort(-top_lp[1:], axis=None)  # every teacher's proposals, most probable first
    for flat in order:
        teacher, slot = divmod(int(flat), top_ids.shape[1])
        token = int(top_ids[1 + teacher, slot])
        if token not in seen:
            seen.add(token)
            wrong.append((token, "wrong", names[teacher]))
        if len(wrong) == config.wrong:
            break
    return [(t, "right", "") for t in right] + wrong


def pause_features(top_ids, top_lp, mean_confidence: float) -> dict:
    """What the stack looked like where a row paused (top_ids/top_lp [N + 1, C], row 0 the stack):
    its top two probabilities, the entropy of its top C plus the rest as one outcome, the share
    of teachers whose first choice is the stack's, and the row's mean top probability so far."""
    p = np.exp(top_lp[0].astype(np.float64))
    rest = max(1.0 - p.sum(), 0.0)
    entropy = float(-(p * np.log(np.maximum(p, 1e-30))).sum() - (rest * np.log(rest) if rest > 0 else 0.0))
    return {"top1": float(p[0]), "top2": float(p[1]), "entropy": entropy,
            "agreement": float(np.mean(top_ids[1:, 0] == top_ids[0, 0])), "confidence": float(mean_confidence)}


def _proposals(top_ids, top_lp, names, pivot) -> dict:
    out = {"stack": [(pivot.decode([int(t)]), round(float(np.exp(lp)), 3)) for t, lp in zip(top_ids[0], top_lp[0],
                                                                                          strict=True)]}
    for i, name in enumerate(names):
        out[name] = [(pivot.decode([int(t)]), round(float(np.exp(lp)), 3))
                     for t, lp in zip(top_ids[i + 1], top_lp[i + 1], strict=True)]
    return out


def search(stack: TeacherStack, record: Record, config: SearchConfig, *, aggregate, rule=sampling.Greedy(),
           top_k: int = 10, weights=None, seed: int = 0) -> SearchResult:
    """Branch search from one prompt; returns every leaf, verified."""
    groups = stack.inputs([record], rows=1, new=config.max_new_tokens, steps=config.max_levels + 1)
    slots = sampling.bucket(config.max_new_tokens)
    settings = stack.settings(
        aggregate=aggregate, rule=rule, top_k=top_k, new_slots=slots, cache_steps=(config.max_levels + 1) * slots,
        branch_entropy=config.branch_entropy, proposals=max(config.right, config.wrong, 4))
    allowed = jnp.asarray(stack.allowed)
    state = lockstep.start(settings, groups, jax.random.key(seed))
    branches = [Branch(0, -1, "root", 0, 0)]
    rows = [0]  # branch id of each batch row
    counted = np.zeros(1, np.int64)  # tokens of each row already counted
    spent, pruned, leaves = 0, 0, []
    while rows:
        batch = state.done.shape[0]
        w = jnp.asarray(stack.weights(batch, weights)[:, stack.order])
        forced = (jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch,), jnp.int32))
        state = lockstep.advance(settings, groups, state, w, allowed, stack.stops,
                                 jnp.int32(config.max_new_tokens), forced)
        done, paused = np.asarray(state.done), np.asarray(state.paused)
        length, confidence = np.asarray(state.length), np.asarray(state.confidence)
        tokens, mask = np.asarray(state.tokens), np.asarray(state.mask)
        top_ids, top_lp = np.asarray(state.top_ids), np.asarray(state.top_logprobs)
        spent += int(sum(length[r] - counted[r] for r in range(len(rows))))
        mean_conf = confidence / np.maximum(length, 1)

        parents, pending, after, new_rows = [], [], [], []
        for r, branch_id in enumerate(rows):
            branch = branches[branch_id]
            branch.length = int(length[r])
            if paused[r]:
                branch.features = pause_features(top_ids[:, r], top_lp[:, r], mean_conf[r]) | {"tokens": branch.length}
            if done[r]:
                ids = tokens[r][mask[r]].tolist()
                text = stack.pivot.decode(ids)
                leaves.append({"branch": branch_id, "text": text, "tokens": ids,
                               "correct": answer_matches(text, record.answer),
                               "confidence": float(mean_conf[r]), "path": _path(branches, branch_id)})
                continue
            if not paused[r]:  # stopped by the cache capacity: cut
                pruned += 1
                continue
            if (length[r] > 0 and mean_conf[r] < config.min_confidence) or spent >= config.token_budget:
                pruned += 1
                continue
            if branch.level >= config.max_levels:  # continue without branching again
                parents.append(r), pending.append(-1), after.append(_NEVER), new_rows.append(branch_id)
                continue
            proposals = _proposals(top_ids[:, r], top_lp[:, r], stack.names, stack.pivot)
            for token, kind, proposer in _children(top_ids[:, r], top_lp[:, r], config, stack.names, stack.pivot):
                child = Branch(len(branches), branch_id, kind, branch.level + 1, int(length[r]), proposals, proposer)
                branches.append(child)
                parents.append(r), pending.append(token), after.append(int(length[r]) + config.gap)
                new_rows.append(child.id)
        if len(new_rows) > config.max_live:  # keep the most confident parents; right before wrong
            rank = sorted(range(len(new_rows)), key=lambda i: (-mean_conf[parents[i]],
                                                               branches[new_rows[i]].kind == "wrong"))
            keep = sorted(rank[: config.max_live])
            pruned += len(new_rows) - len(keep)
            parents, pending, after, new_rows = ([x[i] for i in keep] for x in (parents, pending, after, new_rows))
        if not new_rows:
            break
        size = sampling.bucket(len(new_rows), minimum=1)
        filler = size - len(new_rows)
        state = lockstep.fork(state, jnp.asarray(parents + [parents[0]] * filler, jnp.int32),
                              jnp.asarray(pending + [-1] * filler, jnp.int32),
                              jnp.asarray(after + [_NEVER] * filler, jnp.int32),
                              jnp.asarray([True] * len(new_rows) + [False] * filler))
        counted = np.asarray([length[p] for p in parents] + [0] * filler)
        rows = new_rows
    _locate_mistakes(leaves, branches, stack)
    return SearchResult(record, leaves, branches, spent, pruned)


def _path(branches: list[Branch], branch_id: int) -> list[str]:
    path = []
    while branch_id > 0:
        path.append(branches[branch_id].kind)
        branch_id = branches[branch_id].parent
    return path[::-1]


def _locate_mistakes(leaves: list[dict], branches: list[Branch], stack: TeacherStack) -> None:
    """For each wrong leaf: the first token where it leaves the gold trace sharing its longest prefix."""
    gold = [leaf for leaf in leaves if leaf["correct"]]
    for leaf in leaves:
        if leaf["correct"] or not gold:
            continue
        best, at = None, -1
        for g in gold:
            common = next((i for i, (a, b) in enumerate(zip(leaf["tokens"], g["tokens"], strict=False)) if a != b),
                          min(len(leaf["tokens"]), len(g["tokens"])))
            if common > at:
                best, at = g, common
        leaf["wrong_at"] = at
        leaf["wrong_token"] = stack.pivot.decode(leaf["tokens"][at:at + 1])
        leaf["gold_token"] = stack.pivot.decode(best["tokens"][at:at + 1])
        leaf["gold_branch"] = best["branch"]
        node = branches[leaf["branch"]]
        while node.parent >= 0 and node.position > at:
            node = branches[node.parent]
        if node.position == at and node.proposals is not None:
            leaf["proposals"] = node.proposals
