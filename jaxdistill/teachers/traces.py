"""Branch search on held-out problems, and what it leaves behind: each problem's search saved as
it finishes, best-of-N sampling from the best single teacher at the same tokens, gold traces and
located negatives as the self-distillation loaders read them, and the search tree plotted."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxdistill import runs, sampling
from jaxdistill.data.records import answer_matches
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import search as search_lib
from jaxdistill.teachers.stack import TeacherStack


def search_config(config) -> search_lib.SearchConfig:
    s = config.search
    return search_lib.SearchConfig(right=s.right, wrong=s.wrong, branch_entropy=s.branch_entropy, gap=s.gap,
                                   max_levels=s.max_levels, max_live=s.max_live, min_confidence=s.min_confidence,
                                   token_budget=s.token_budget, max_new_tokens=s.max_new_tokens)


def run_search(config, stack, problems, workdir: Path, teacher, fewshot) -> dict | None:
    """Branch search per problem (saved as it finishes), then best-of-N sampling from `teacher` (the
    best single teacher on training problems) with the same number of generated tokens, over `seeds` seeds.
    `stack()` returns the teacher stack; it is called only for work that is not saved yet."""
    if not problems:
        return None
    sc = search_config(config)
    rule = agg_lib.rule_from_config(config.search.rule, threshold=config.gate_threshold)
    (workdir / "search").mkdir(exist_ok=True)
    found = []
    for record in tqdm(problems, desc="branch search: problems", unit="problem"):
        found.append(search_saved(stack, record, sc, rule, config.top_k, workdir / "search" / f"{record.uid}.json"))

    alone = functools.cache(lambda: TeacherStack([teacher], pivot=teacher.model, loaded=stack().models,
                                                 fewshot=fewshot))
    baseline = [best_of_n(alone, problems, [r["tokens"] for r in found], seed,
                          config.search.baseline_temperature, sc.max_new_tokens,
                          workdir / "search" / f"best-of-n-seed{seed}.json")
                for seed in range(config.seeds)]  # per seed: gold traces and tokens per problem

    write_traces(problems, found, stack, workdir, rule, config.top_k, config.search.get("trace_top", 0))
    plot_tree(found[0], problems[0], workdir / "search_tree.png")
    search_tokens = sum(r["tokens"] for r in found)
    search_gold = sum(sum(leaf["correct"] for leaf in r["leaves"]) for r in found)
    return {
        "problems": len(problems), "rule": config.search.rule, "teacher_for_best_of_n": teacher.name,
        "search": {"tokens": search_tokens, "gold": search_gold, "gold_per_1k": 1000 * search_gold / search_tokens,
                   "solved": sum(any(leaf["correct"] for leaf in r["leaves"]) for r in found),
                   "leaves": sum(len(r["leaves"]) for r in found), "pruned": sum(r["pruned"] for r in found),
                   "seconds": sum(r["seconds"] for r in found)},
        "best_of_n": [{"tokens": sum(r["tokens"] for r in rows), "gold": sum(r["gold"] for r in rows),
                       "gold_per_1k": 1000 * sum(r["gold"] for r in rows) / max(sum(r["tokens"] for r in rows), 1),
                       "solved": sum(r["gold"] > 0 for r in rows), "draws": sum(r["draws"] for r in rows)}
                      for rows in baseline],
    }


def best_of_n(teacher, problems, budgets: list[int], seed: int, temperature: float, max_new_tokens: int,
              path: Path) -> list[dict]:
    """Independent samples (4 per call) from one teacher until each problem has used its token budget;
    per problem the gold traces (count and texts), tokens, draws and, per sample in draw order, its
    tokens, whether it is right and the teacher's top probability at each token (what the search's
    confidence pruner reads; `matched_best_of_n` replays them). Saved to `path`; read back if it holds
    these problems. `teacher()` returns the one-teacher stack; it is called only when sampling is needed,
    so a rerun with every file saved loads no model."""
    if not path.exists() or [r["uid"] for r in json.loads(path.read_text())] != [r.uid for r in problems]:
        alone = teacher()
        sample, rows = sampling.Sample(temperature=temperature), []
        for record, budget in zip(problems, budgets, strict=True):
            gold, samples, tokens, k = [], [], 0, 0
            while tokens < budget:
                out = alone.run([record] * 4, rule=sample, max_new_tokens=max_new_tokens, seed=seed * 1000 + k,
                                record_top=1)
                k += 1
                top = np.exp(out.top_logprobs[..., 0])
                for text, mask, p in zip(out.texts, out.mask, top, strict=True):
                    if tokens >= budget:
                        break
                    tokens += int(mask.sum())
                    correct = answer_matches(text, record.answer)
                    samples.append({"tokens": int(mask.sum()), "correct": correct,
                                    "top_p": np.round(p[mask], 4).tolist()})
                    if correct:
                        gold.append(text)
            rows.append({"uid": record.uid, "gold": len(gold), "gold_texts": gold, "tokens": tokens,
                         "draws": len(samples), "samples": samples})
        runs.atomic_write_text(path, json.dumps(rows))
    return json.loads(path.read_text())


def same_text(text: str) -> str:
    """A gold text's identity when counting distinct ones: its words, whitespace ignored."""
    return " ".join(text.split())


def matched_best_of_n(row: dict, budget: int, min_confidence: float = 0.0) -> dict:
    """Best-of-N on one problem replayed at exactly `budget` generated tokens, with the search's
    confidence pruner applied to its samples: a sample stops at the first token where its mean top
    probability so far falls below `min_confidence` (and is not gold). The sample that crosses the
    budget is cut there and is not gold either. Returns gold, distinct gold texts (among the gold
    samples that finished, by their text) and tokens (= budget while samples last)."""
    spent, gold, texts = 0, 0, set()
    golds = iter(row["gold_texts"])
    for s in row["samples"]:
        if spent >= budget:
            break
        p = np.asarray(s["top_p"], np.float64)
        running = np.cumsum(p) / np.arange(1, len(p) + 1)
        below = np.flatnonzero(running < min_confidence)
        length = int(below[0]) + 1 if below.size else s["tokens"]
        text = next(golds) if s["correct"] else None
        if spent + length > budget:
            spent = budget
            break
        spent += length
        if s["correct"] and not below.size:
            gold += 1
            texts.add(same_text(text))
    return {"gold": gold, "distinct": len(texts), "tokens": spent}


def search_saved(stack, record, sc: search_lib.SearchConfig, rule, top_k: int, path: Path) -> dict:
    """One problem's branch search as saved JSON (leaves and branches); read back if already saved.
    `stack()` returns the teacher stack."""
    def compute():
        t0 = time.perf_counter()
        result = search_lib.search(stack(), record, sc, aggregate=rule, top_k=top_k)
        return {"uid": record.uid, "tokens": result.tokens, "pruned": result.pruned,
                "seconds": time.perf_counter() - t0, "leaves": result.leaves,
                "branches": [dataclasses.asdict(b) for b in result.branches]}

    return runs.json_once(path, compute)


def write_traces(problems, found, stack, workdir: Path, rule=None, top_k: int = 10, trace_top: int = 0) -> None:
    """traces.jsonl: gold traces in the generic record form the self-distillation loader reads
    (prompt, solution, answer); negatives.jsonl: preference pairs with the located mistake.

    With trace_top > 0, each gold trace also carries the stack's aggregated distribution at each
    of its tokens (the top `trace_top` pivot ids and log-probs, scored by forcing the trace, saved
    per problem beside its search): a sparse multi-teacher target. `stack()` returns the teacher stack."""
    gold_lines, negative_lines = [], []
    for record, result in zip(problems, found, strict=True):
        by_branch = {leaf["branch"]: leaf for leaf in result["leaves"]}
        gold = [leaf for leaf in result["leaves"] if leaf["correct"]]

        def score(gold=gold, record=record):
            out = stack().score([record] * len(gold), [g["tokens"] for g in gold], aggregate=rule, top_k=top_k,
                                record_top=trace_top)
            return {"top_ids": out.top_ids.tolist(), "top_logprobs": np.round(out.top_logprobs, 4).tolist()}

        scored = (runs.json_once(workdir / "search" / f"{record.uid}-top{trace_top}.json", score)
                  if gold and trace_top else None)
        for leaf in result["leaves"]:
            meta = {"uid": record.uid, "branch": leaf["branch"], "path": leaf["path"],
                    "confidence": leaf["confidence"]}
            if leaf["correct"]:
                line = {"prompt": record.problem, "solution": leaf["text"], "answer": record.answer, "kind": "gold",
                        **meta}
                if scored is not None:
                    row, n = gold.index(leaf), len(leaf["tokens"])
                    line |= {"pivot_tokens": leaf["tokens"], "top_ids": scored["top_ids"][row][:n],
                             "top_logprobs": scored["top_logprobs"][row][:n]}
                gold_lines.append(line)
            elif "wrong_at" in leaf:
                negative_lines.append({
                    "prompt": record.problem, "chosen": by_branch[leaf["gold_branch"]]["text"],
                    "rejected": leaf["text"], "answer": record.answer, "kind": "negative",
                    "wrong_at_token": leaf["wrong_at"], "wrong_token": leaf["wrong_token"],
                    "gold_token": leaf["gold_token"], "proposals": leaf.get("proposals"), **meta})
    for name, lines in (("traces.jsonl", gold_lines), ("negatives.jsonl", negative_lines)):
        runs.atomic_write_text(workdir / name, "".join(json.dumps(line) + "\n" for line in lines))


def plot_tree(result: dict, record, path: Path) -> None:
    """One problem's search tree: branches by the token where they left their parent, coloured by
    direction, leaves by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    branches = result["branches"]
    ends = {leaf["branch"]: leaf for leaf in result["leaves"]}
    lane = {}
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(branches) + 1.5))
    for b in branches:
        lane[b["id"]] = len(lane)
        y = lane[b["id"]]
        end = len(ends[b["id"]]["tokens"]) if b["id"] in ends else b["position"] + 1
        colour = {"root": "black", "right": "tab:blue", "wrong": "tab:red"}[b["kind"]]
        if b["parent"] >= 0:
            ax.plot([b["position"], b["position"]], [lane[b["parent"]], y], color="lightgray", lw=0.8, zorder=1)
        ax.plot([b["position"], end], [y, y], color=colour, lw=2, zorder=2)
        if b["id"] in ends:
            ax.scatter([end], [y], color="tab:green" if ends[b["id"]]["correct"] else "gray", s=30, zorder=3)
    ax.invert_yaxis()
    ax.set_yticks([])
    ax.set_xlabel("token position")
    ax.set_title(f"search tree for {record.uid}: blue right direction, red wrong direction; "
                 "green leaf verified, gray wrong", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_search(searched: dict) -> str:
    s, runs_ = searched["search"], searched["best_of_n"]
    per_1k = [r["gold_per_1k"] for r in runs_]
    solved = [r["solved"] for r in runs_]
    return "\n".join([
        "", f"Branch search ({searched['rule']}) on {searched['problems']} problems vs best-of-N sampling from "
        f"{searched['teacher_for_best_of_n']} at the same generated tokens ({len(runs_)} seeds):", "",
        "| method | generated tokens | gold traces | gold per 1k tokens | problems with a gold trace |",
        "|---|---:|---:|---:|---:|",
        f"| branch search | {s['tokens']} | {s['gold']} | {s['gold_per_1k']:.2f} | {s['solved']} |",
        f"| best-of-N | {np.mean([r['tokens'] for r in runs_]):.0f} | {np.mean([r['gold'] for r in runs_]):.1f} | "
        f"{np.mean(per_1k):.2f} ± {np.std(per_1k):.2f} | {np.mean(solved):.1f} |",
        "", f"Search: {s['leaves']} leaves, {s['pruned']} branches pruned, {s['seconds']:.0f}s."])
