"""Precompute every expert path of every question, so the router's environment is arrays.

Paths form a complete N-ary tree per question, stored in heap order: node 0 is the start
(no answer yet) and the children of node i are N*i + 1 + a for expert a. A node at depth t
holds the answer after t calls. Each call is made once, from its parent's answer, so
shared prefixes are computed once: N + N^2 + ... + N^T_max calls per question.

Work is split into units (depth, expert, chunk of parent nodes), each written atomically
to `<dir>/units/` as JSON; a rerun skips finished units, so an interrupted precompute
resumes where it stopped. With `num_hosts` > 1 each host takes every num_hosts-th unit
of a depth and waits for the others' files (a shared filesystem) before the next depth.
Scores and embeddings are computed last, into `<dir>/table.npz`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxdistill.data import metrics
from jaxdistill.data.qa import Question


def num_nodes(n_experts: int, t_max: int) -> int:
    return sum(n_experts**t for t in range(t_max + 1))


def depth_range(n_experts: int, depth: int) -> range:
    """Node ids at a depth (0 = the start node)."""
    start = num_nodes(n_experts, depth - 1) if depth else 0
    return range(start, start + n_experts**depth)


def child(node, action, n_experts: int):
    return node * n_experts + 1 + action


def path_of(node: int, n_experts: int) -> list[int]:
    """The expert calls leading to a node, first call first."""
    path = []
    while node:
        path.append((node - 1) % n_experts)
        node = (node - 1) // n_experts
    return path[::-1]


@dataclasses.dataclass
class Table:
    """Everything the environment needs, per question q and node m."""

    quality: np.ndarray  # [Q, M] float32, 0 at the start node
    flops: np.ndarray  # [Q, M] float64: FLOPs of the call that produced node m (0 at the start)
    question_emb: np.ndarray  # [Q, D] float32
    answer_emb: np.ndarray  # [Q, M, D] float32, zeros at the start node
    answers: list[list[str]]  # [Q][M]
    uids: list[str]
    families: list[str]
    expert_names: list[str]
    t_max: int

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def save(self, path: Path) -> None:
        arrays = {k: getattr(self, k) for k in ("quality", "flops", "question_emb", "answer_emb")}
        meta = {k: getattr(self, k) for k in ("answers", "uids", "families", "expert_names", "t_max")}
        _atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))

    @classmethod
    def load(cls, path: Path) -> Table:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(**{k: data[k] for k in ("quality", "flops", "question_emb", "answer_emb")}, **meta)

    def subset(self, rows: Sequence[int]) -> Table:
        rows = list(rows)
        return dataclasses.replace(
            self, quality=self.quality[rows], flops=self.flops[rows], question_emb=self.question_emb[rows],
            answer_emb=self.answer_emb[rows], answers=[self.answers[r] for r in rows],
            uids=[self.uids[r] for r in rows], families=[self.families[r] for r in rows])


    def without_transfer(self) -> Table:
        """The table of the same pool without the Knowledge Transfer Prompt: every call answers the
        question alone, so node (parent, expert a) holds expert a's first answer, at its first cost.
        Exact for greedy experts, which answer a prompt the same way every time: no new calls."""
        n = self.n_experts
        source = [0] + [child(0, path_of(m, n)[-1], n) for m in range(1, self.quality.shape[1])]
        return dataclasses.replace(
            self, quality=self.quality[:, source], flops=self.flops[:, source], answer_emb=self.answer_emb[:, source],
            answers=[[row[m] for m in source] for row in self.answers])


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def _fingerprint(questions: Sequence[Question], pool, t_max: int, seed: int) -> str:
    setup = {"questions": [dataclasses.astuple(q) for q in questions], "t_max": t_max, "seed": seed,
             "experts": [dataclasses.asdict(e) for e in pool.experts], "ktp": pool.ktp_template}
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def precompute(pool, encoder, questions: Sequence[Question], directory: str | Path, *, t_max: int,
               chunk: int = 256, seed: int = 0, host: int = 0, num_hosts: int = 1,
               embedding_metric: metrics.EmbeddingSimilarity | None = None, poll_seconds: float = 5.0,
               progress: bool = True) -> Table:
    """Run (or resume) every expert call, then score and embed; returns the Table."""
    directory = Path(directory)
    table_path = directory / "table.npz"
    fingerprint = _fingerprint(questions, pool, t_max, seed)
    manifest = directory / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["fingerprint"] != fingerprint:
        raise ValueError(f"{directory} holds a precompute of different questions, experts or settings; "
                         "use a new directory (or delete this one) to start over.")
    if table_path.exists() and manifest.exists():
        return Table.load(table_path)
    if host == 0:
        _atomic_write(manifest, lambda f: f.write(json.dumps({"fingerprint": fingerprint}).encode()))

    n, q_count = len(pool), len(questions)
    total_nodes = num_nodes(n, t_max)
    answers = [[""] * total_nodes for _ in range(q_count)]
    flops = np.zeros((q_count, total_nodes))
    total_calls = q_count * (total_nodes - 1)
    bar = tqdm(total=total_calls, desc="precompute: expert calls", unit="call", disable=not progress)
    for depth in range(1, t_max + 1):
        # (question, parent) pairs whose children this depth computes
        pairs = [(q, p) for p in depth_range(n, depth - 1) for q in range(q_count)]
        units = [(a, c) for a in range(n) for c in range(0, len(pairs), chunk)]
        for index, (a, c) in enumerate(units):
            path = directory / "units" / f"depth{depth}_expert{a}_from{c}.json"
            if not path.exists() and index % num_hosts == host:
                part = pairs[c:c + chunk]
                texts = [questions[q].text for q, _ in part]
                previous = [answers[q][p] if p else None for q, p in part]
                unit_seed = seed * 1_000_003 + depth * 10_007 + a * 101 + c
                out, cost = pool.call(a, texts, previous, seed=unit_seed)
                _atomic_write(path, lambda f, out=out, cost=cost: f.write(
                    json.dumps({"answers": out, "flops": cost.tolist()}).encode()))
            bar.update(min(chunk, len(pairs) - c))
        for a, c in units:  # gather this depth (waiting for other hosts' units)
            path = directory / "units" / f"depth{depth}_expert{a}_from{c}.json"
            while not path.exists():
                bar.set_postfix_str(f"waiting for {path.name} from another host")
                time.sleep(poll_seconds)
            unit = json.loads(path.read_text())
            for (q, p), text, cost in zip(pairs[c:c + chunk], unit["answers"], unit["flops"], strict=True):
                node = child(p, a, n)
                answers[q][node], flops[q, node] = text, cost
    bar.close()
    if host != 0:  # host 0 scores, embeds and writes the table
        while not table_path.exists():
            time.sleep(poll_seconds)
        return Table.load(table_path)
    table = _score_and_embed(questions, answers, flops, encoder, pool, t_max, embedding_metric, progress)
    table.save(table_path)
    return table


def _score_and_embed(questions, answers, flops, encoder, pool, t_max, embedding_metric, progress) -> Table:
    q_count, total_nodes = flops.shape
    quality = np.zeros((q_count, total_nodes), np.float32)
    for q, question in enumerate(questions):
        quality[q, 1:] = metrics.score(question.metric, answers[q][1:], [question.references] * (total_nodes - 1),
                                       embedding=embedding_metric)
    unique = sorted({a for row in answers for a in row[1:]} | {q.text for q in questions})
    if progress:
        print(f"precompute: embedding {len(unique)} distinct texts with {encoder.model.config.arch} "
              f"(d={encoder.dim})", flush=True)
    vectors = dict(zip(unique, encoder.embed(unique), strict=True))
    zero = np.zeros(encoder.dim, np.float32)
    answer_emb = np.stack([[zero] + [vectors[a] for a in row[1:]] for row in answers]).astype(np.float32)
    question_emb = np.stack([vectors[q.text] for q in questions]).astype(np.float32)
    return Table(quality=quality, flops=flops, question_emb=question_emb, answer_emb=answer_emb, answers=answers,
                 uids=[q.uid for q in questions], families=[q.family for q in questions],
                 expert_names=[e.name for e in pool.experts], t_max=t_max)
