"""SFT of SmolLM2 on the stack's search-found gold traces vs on the best single teacher's correct samples.

    python experiments/self_distill/grid.py --arms=sft --seeds=0            # the fine-tuned teacher (~10 min)
    python experiments/teachers/traces_sft.py --finetuned=runs/grid/sft-s0  # search, sample, then SFT x seeds

1. Branch search (the stack of `experiments/teachers/pruning.py` with the fine-tuned teacher:
   right 2, wrong 1, two levels, confidence pruning at `--min-confidence`) on the first
   `--problems` *training* problems; its gold traces are the first SFT set.
2. Best-of-N sampling from the best single teacher (the fine-tuned one, temperature 0.7) on
   the same problems with the same tokens per problem; its correct samples are the second.
3. Both sets are cut to the same number of examples (problem by problem, in order), written
   as generic JSONL (`prompt`/`solution`/`answer`) under sets-s{seed}/, next to the 64 held-out
   problems of the self-distillation default (`eval.jsonl`).
4. `python -m jaxdistill train --config.arm=sft` on each set, evaluated on those held-out
   problems; finished runs are skipped, so the script resumes.

Steps 2-4 run once per seed of `--seeds`: each seed draws its own best-of-N samples (the search
is greedy, so its traces are the same), cuts its own pair of sets and trains on them, so the
spread over seeds includes the data's.

Everything is written under `--workdir` (default runs/traces-sft); the table is printed and
saved as summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxdistill import runs, stats
from jaxdistill.data.synthetic import SyntheticConfig, synthetic_records
from jaxdistill.teachers import aggregate as agg_lib
from jaxdistill.teachers import pruning, traces
from jaxdistill.teachers import run as teachers_run
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack

PRUNING_CONFIG = Path(__file__).with_name("pruning.py")
SELF_DISTILL = "experiments/self_distill/default.py"


def load_config(finetuned: str, max_new_tokens: int, branch_entropy: float):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pruning_config", PRUNING_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(finetuned)
    config.search.max_new_tokens, config.search.branch_entropy = max_new_tokens, branch_entropy
    return config


def generic(record, solution: str) -> dict:
    return {"prompt": record.problem, "solution": solution, "answer": record.answer}


def build_sets(config, problems, workdir: Path, min_confidence: float, seed: int) -> dict:
    """Search and best-of-N (seed `seed`) on `problems`; writes sets-s{seed}/search.jsonl and
    best_of_n.jsonl of equal length. The search's trees are saved once, for every seed."""
    sc = dataclasses.replace(pruning.complete_search_config(config), min_confidence=min_confidence)
    (workdir / "search").mkdir(parents=True, exist_ok=True)
    fewshot = teachers_run.problems(config).fewshot
    best_name = config.pruning.best_of_n_teacher
    paths = [workdir / "search" / f"{r.uid}.json" for r in problems]
    bon_path = workdir / "search" / f"best-of-n-{best_name}-seed{seed}.json"
    stack = functools.cache(lambda: teachers_run.load_stack(config, fewshot)[0])
    rule = agg_lib.rule_from_config(config.search.rule, threshold=config.gate_threshold)
    found = [traces.search_saved(stack, r, sc, rule, config.top_k, p)
             for r, p in tqdm(list(zip(problems, paths, strict=True)), desc="branch search: training problems")]

    def alone() -> TeacherStack:
        teacher = TeacherConfig.from_config(next(t for t in config.teachers if t["name"] == best_name))
        return TeacherStack([teacher], pivot=teacher.model, loaded=stack().models, fewshot=fewshot)

    sampled = traces.best_of_n(alone, problems, [max(f["tokens"], 1) for f in found], seed,
                                     config.search.baseline_temperature, config.search.max_new_tokens, bon_path)
    search_sets = [[leaf["text"] for leaf in f["leaves"] if leaf["correct"]] for f in found]
    sample_sets = [row["gold_texts"] for row in sampled]
    search_lines = [generic(r, t) for r, texts in zip(problems, search_sets, strict=True) for t in texts]
    sample_lines = [generic(r, t) for r, texts in zip(problems, sample_sets, strict=True) for t in texts]
    n = min(len(search_lines), len(sample_lines))
    if n == 0:
        raise SystemExit(f"no gold examples to train on (search {len(search_lines)}, best-of-N {len(sample_lines)}): "
                         "search more problems (--problems) or lower --min-confidence.")
    (workdir / f"sets-s{seed}").mkdir(exist_ok=True)
    for name, lines in (("search.jsonl", search_lines[:n]), ("best_of_n.jsonl", sample_lines[:n])):
        runs.atomic_write_text(workdir / f"sets-s{seed}" / name, "".join(json.dumps(x) + "\n" for x in lines))
    return {"seed": seed, "examples": n, "search_gold": len(search_lines), "best_of_n_gold": len(sample_lines),
            "search_tokens": sum(f["tokens"] for f in found), "best_of_n_tokens": sum(r["tokens"] for r in sampled),
            "problems_with_search_gold": sum(bool(s) for s in search_sets),
            "problems_with_best_of_n_gold": sum(bool(s) for s in sample_sets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", default="runs/grid/sft-s0", help="work directory of the fine-tuned teacher")
    parser.add_argument("--problems", type=int, default=32, help="training problems to search and sample")
    parser.add_argument("--min-confidence", type=float, default=0.7, help="the search's confidence pruner")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="runs/traces-sft")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="per search branch and per sample")
    parser.add_argument("--branch-entropy", type=float, default=1.0, help="where the search branches (nats)")
    parser.add_argument("--train", action="append", default=[], help="extra override for every SFT run")
    args = parser.parse_args()
    commit = runs.source_commit()  # the code this run loads (each SFT run records its own too)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_config(args.finetuned, args.max_new_tokens, args.branch_entropy)
    pruning.validate(config)
    d = config.data  # the self-distillation default's problems: one step, start <= 20, operand <= 12
    synthetic = SyntheticConfig(steps=d.steps, max_start=d.max_start, max_operand=d.max_operand)
    problems = synthetic_records(args.problems, d.seed, synthetic, "train")
    held_out = synthetic_records(64, d.seed, synthetic, "test")  # the default's 64 held-out problems
    runs.atomic_write_text(workdir / "eval.jsonl", "".join(json.dumps(generic(r, r.solution)) + "\n"
                                                           for r in held_out))
    results, sets = {}, []
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed by seed, so a stopped run compares evenly
        sets.append(build_sets(config, problems, workdir, args.min_confidence, seed=seed))
        print(f"seed {seed}: {sets[-1]['examples']} examples per set (search found {sets[-1]['search_gold']} on "
              f"{sets[-1]['problems_with_search_gold']} problems, best-of-N {sets[-1]['best_of_n_gold']} on "
              f"{sets[-1]['problems_with_best_of_n_gold']})", flush=True)
        for name in ("search", "best_of_n"):
            out = workdir / f"sft-{name}-s{seed}"
            if not (out / "summary.json").exists():
                train_path = workdir / f"sets-s{seed}" / f"{name}.jsonl"
                overrides = ["arm=sft", "data.source=jsonl", f"data.train_path={train_path}",
                             f"data.eval_path={workdir / 'eval.jsonl'}", f"seed={seed}", f"workdir={out}",
                             "eval.before=False", *args.train]
                command = [sys.executable, "-m", "jaxdistill", "train", f"--config={SELF_DISTILL}",
                           *[f"--config.{o}" for o in overrides]]
                print("$", " ".join(command[1:]), flush=True)
                if subprocess.run(command).returncode:
                    raise SystemExit(f"the SFT run in {out} failed (its error is above); fix it and rerun: finished "
                                     "runs are kept.")
            results.setdefault(name, []).append(json.loads((out / "summary.json").read_text()))
    record = {"commit": commit, "sets": sets, "runs": {
        name: [{"seed": s["seed"], "eval": r["eval"]["after"], "per_problem": r["per_problem"]["after"],
                "commit": r.get("commit")} for s, r in zip(sets, rows, strict=True)]
        for name, rows in results.items()}}
    runs.atomic_write_text(workdir / "results.json", json.dumps(record, indent=1))
    summary = table(record)
    runs.atomic_write_text(workdir / "summary.md", summary)
    print(summary)


def table(record: dict) -> str:
    """Each training set's held-out accuracy over seeds (mean ± sample sd, seed values in brackets) and
    the paired difference search minus best-of-N (bootstrap over seeds and the held-out problems), from
    results.json alone: the summary and docs/teachers.md's table (`scripts/docs_tables.py traces-sft`)."""
    sets, results = record["sets"], record["runs"]
    examples = ", ".join(f"seed {s['seed']}: {s['examples']}" for s in sets)
    found = "; ".join(f"seed {s['seed']}: {s['search_gold']} on {s['problems_with_search_gold']} in "
                      f"{s['search_tokens']:,} tokens / {s['best_of_n_gold']} on {s['problems_with_best_of_n_gold']} "
                      f"in {s['best_of_n_tokens']:,}" for s in sets)
    lines = [f"Examples per set: {examples}. Gold found (search / best-of-N: gold answers on problems, generated "
             f"tokens): {found}.", "",
             "| training set | seeds | pCoT accuracy | pTeacher accuracy | length |", "|---|---:|---:|---:|---:|"]
    for name, rows in results.items():
        def cell(key, rows=rows, digits=3):
            values = [r["eval"][key] for r in rows]
            mean, sd = stats.mean_sd(values)
            return f"{mean:.{digits}f} ± {sd:.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"
        lines.append(f"| {name} | {len(rows)} | {cell('accuracy')} | {cell('accuracy_teacher')} | "
                     f"{cell('length', digits=1)} |")
    correct = {name: np.asarray([r["per_problem"]["correct"] for r in rows], float) for name, rows in results.items()}
    d = stats.bootstrap(correct["search"], minus=correct["best_of_n"])
    lines += ["", f"search minus best-of-N, pCoT accuracy: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
              f"(paired 95% bootstrap over {correct['search'].shape[0]} seed(s) and {correct['search'].shape[1]} "
              f"problems; smallest detectable difference {stats.detectable_difference(d['se']):.3f})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
