"""Every arm of docs/results.md ("Why the method loses at 135M"), over seeds, and its report.

    python experiments/self_distill/grid.py                      # run what is missing, then report
    python experiments/self_distill/grid.py --arms=blend,sft --seeds=0,1,2
    python experiments/self_distill/grid.py --report             # only the table and the plots

Each arm is the default config plus overrides, run as its own `python -m jaxdistill train`
process in runs/grid/<arm>-s<seed>. A finished run leaves a record in docs/results/grid/
(<arm>-s<seed>.json: its overrides, summary and per-step metrics), committed with the docs so
the report survives the run directories (a fresh machine has none); a run with a record is
skipped, so an interrupted grid resumes with the next run. The untrained model is evaluated once
per task, in the first run of that task. The report prints a markdown table (mean ± sample std
over seeds of the held-out metrics and of the training-time mechanism metrics, accuracy's 95%
interval) and writes docs/results/mechanism.png and docs/results/kl_by_position.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from jaxdistill import runs, stats

CONFIG = "experiments/self_distill/default.py"
ARMS = {  # name: (what it is, overrides)
    "blend": ("the method: entropy-matched blend, forward KL", []),
    "teacher": ("pure teacher target, forward KL", ["arm=teacher"]),
    "blend-rkl": ("blend, reverse KL (full vocabulary)", ["loss.kind=reverse_kl"]),
    "blend-srkl": ("blend, sampled-token reverse KL (on-policy distillation form)", ["loss.kind=sampled_reverse_kl"]),
    "blend-jsd": ("blend, generalized JSD(0.5)", ["loss.kind=jsd"]),
    "teacher-rkl": ("pure teacher, reverse KL", ["arm=teacher", "loss.kind=reverse_kl"]),
    "teacher-srkl": ("pure teacher, sampled-token reverse KL", ["arm=teacher", "loss.kind=sampled_reverse_kl"]),
    "teacher-jsd": ("pure teacher, JSD(0.5)", ["arm=teacher", "loss.kind=jsd"]),
    "blend-top20": ("blend, forward KL on the target's top 20 tokens", ["loss.top_k=20"]),
    "blend-clip": ("blend, forward KL with each token's loss capped at 0.1 nats", ["loss.clip=0.1"]),
    "blend-lr2e-6": ("the method at lr 2e-6 (5x lower)", ["optim.lr=2e-6"]),
    "teacher-srkl-lr2e-6": ("pure teacher, sampled-token reverse KL, lr 2e-6 (5x lower)",
                            ["arm=teacher", "loss.kind=sampled_reverse_kl", "optim.lr=2e-6"]),
    "blend-guided": ("the method, traces sampled from the blended target instead of the student", ["guided=True"]),
    "blend-b8": ("the method, 8 problems per update", ["batch_size=8"]),
    "blend-n4": ("the method, 4 samples per problem per update", ["samples_per_problem=4"]),
    "wrong-hint": ("control: another problem's solution as the hint", ["hint=wrong"]),
    "no-hint": ("control: no hint (the loss must be ~0)", ["hint=none"]),
    "teacher-rollout": ("off-policy: blend loss on samples from pTeacher", ["rollout=teacher"]),
    "sft": ("SFT on the reference solutions", ["arm=sft"]),
    "rejection-sft": ("SFT on the student's own correct samples", ["arm=rejection_sft"]),
    "teacher-sample-sft": ("SFT on pTeacher's correct samples (sequence-level KD)",
                           ["arm=rejection_sft", "rollout=teacher"]),
    "blend-no-end": ("fix: the end-token positions left out of the loss", ["loss.end_weight=0"]),
    "blend-seq": ("fix: per-sample (length-normalised) loss", ["loss.normalize=sequence"]),
    "blend-sft0.1": ("fix: the method plus 0.1 x the cross-entropy on the reference solutions", ["sft_weight=0.1"]),
    "blend-frozen": ("fix: a frozen copy of the initial model teaches (the target cannot drift)",
                     ["frozen_teacher=True"]),
    "lora-base": ("LoRA rank 16 on every projection (lr 1e-4, LoRA's usual 10x): the frozen base model teaches "
                  "(adapters off for the teacher rows)", ["lora.rank=16", "frozen_teacher=True", "optim.lr=1e-4"]),
    "stack": ("the teacher stack (3 frozen teachers, with the hint) as a sparse top-20 target", ["arm=stack"]),
    "stack-end": ("the stack with its few-shot teachers' end of reply as the end of turn",
                  ["arm=stack", "stack.fewshot_ends_turn=True"]),
    # a second model: Gemma 3 270M, a base model with few-shot prompts
    "gemma-blend": ("Gemma 3 270M few-shot: the method", ["model=gemma3-270m", "prompts.style=fewshot"]),
    "gemma-sft": ("Gemma 3 270M few-shot: SFT", ["model=gemma3-270m", "prompts.style=fewshot", "arm=sft"]),
    "gemma-blend-lr2e-6": ("Gemma 3 270M few-shot: the method at lr 2e-6",
                           ["model=gemma3-270m", "prompts.style=fewshot", "optim.lr=2e-6"]),
    # the non-verifiable case: conversations revised under constraints, the accepted reply as the hint
    "conv-blend": ("conversations: the method", ["data.source=conversations"]),
    "conv-teacher": ("conversations: pure teacher target", ["data.source=conversations", "arm=teacher"]),
    "conv-sft": ("conversations: SFT on the accepted replies", ["data.source=conversations", "arm=sft"]),
}
MATH = ("accuracy", "accuracy_teacher", "length", "ended", "answer_line", "copy_solution_4gram")
HELD_OUT = {  # task: held-out columns
    "math": MATH,
    "gemma": MATH,
    "conversations": ("constraints", "reference_logp", "hint_uplift_logp", "length", "ended", "copy_solution_4gram"),
}
TRAINING = ("reward", "end_p_student", "end_p_target")  # means over the training steps (metrics.jsonl has more)
LABELS = {  # column headers of the report
    "accuracy": "pCoT acc.", "accuracy_teacher": "pTeacher acc.", "length": "length", "ended": "ends in 96",
    "answer_line": "'####' line", "copy_solution_4gram": "4-gram copy", "constraints": "constraints met",
    "reference_logp": "log p(accepted)", "hint_uplift_logp": "hint uplift",
    "reward": "reward", "end_p_student": "p(end) student where samples end", "end_p_target": "p(end) target there",
}


def task(arm: str) -> str:
    overrides = ARMS[arm][1]
    return ("conversations" if "data.source=conversations" in overrides else
            "gemma" if "model=gemma3-270m" in overrides else "math")


def workdir(root: Path, arm: str, seed: int) -> Path:
    return root / f"{arm}-s{seed}"


def record_path(records: Path, arm: str, seed: int) -> Path:
    return records / f"{arm}-s{seed}.json"


def keep_record(records: Path, out: Path, arm: str, seed: int, overrides: list[str]) -> None:
    """The finished run's summary (per-problem outcomes included) and metrics, where the report reads them."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    record = {"arm": arm, "seed": seed, "overrides": overrides, "commit": summary.get("commit", runs.source_commit()),
              "summary": summary, "metrics": rows}
    records.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(record_path(records, arm, seed), json.dumps(record, separators=(",", ":")))


def has_before(records: Path, name: str) -> bool:
    """Whether a recorded run of task `name` evaluated the untrained model."""
    return any(task(r["arm"]) == name and "before" in r["summary"]["eval"]
               for r in map(json.loads, map(Path.read_text, records.glob("*.json"))) if r["arm"] in ARMS)


def run(root: Path, records: Path, arm: str, seed: int, extra: list[str]) -> None:
    out = workdir(root, arm, seed)
    if record_path(records, arm, seed).exists():
        return
    overrides = ARMS[arm][1] + [f"seed={seed}", f"workdir={out}"] + extra
    overrides.append(f"eval.before={not has_before(records, task(arm))}")  # the untrained model, once per task
    command = [sys.executable, "-m", "jaxdistill", "train", f"--config={CONFIG}",
               *[f"--config.{o}" for o in overrides]]
    if not (out / "summary.json").exists():
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    keep_record(records, out, arm, seed, overrides)
    # A finished run needs only its last checkpoint (1.4 GB for SmolLM2 with AdamW): a grid of dozens of
    # runs keeping two each filled this machine's disk.
    found = (out / "checkpoints").iterdir() if (out / "checkpoints").exists() else ()
    steps = sorted((int(c.name), c) for c in found if c.name.isdigit())
    for _, older in steps[:-1]:
        shutil.rmtree(older)


def load(records: Path, arm: str, seeds: list[int]) -> list[dict]:
    """The records of the recorded seeds, in seed order."""
    paths = (record_path(records, arm, seed) for seed in seeds)
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def cell(values) -> str:
    """Mean ± sample standard deviation over seeds (ddof=1), or the one value."""
    mean, sd = stats.mean_sd(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if not math.isnan(sd) else f"{mean:.3f}"


def training_mean(rows, name: str) -> float:
    values = [r[name] for r in rows if isinstance(r.get(name), (int, float)) and not math.isnan(r[name])]
    return float(np.mean(values)) if values else float("nan")


def outcomes(found: list[dict], name: str = "correct", when: str = "after") -> np.ndarray | None:
    """[seeds, problems] per-problem outcomes of the runs, or None when a record predates them."""
    rows = [r["summary"].get("per_problem", {}).get(when, {}).get(name) for r in found]
    if not rows or any(row is None for row in rows):
        return None
    return np.asarray([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def interval(found: list[dict], metric: str, name: str) -> str:
    """95% interval of the arm's mean: bootstrap over problems and seeds where the records hold
    per-problem outcomes, else Student t over the seeds' means."""
    per_problem = outcomes(found, name)
    if per_problem is not None:
        b = stats.bootstrap(per_problem)
        return f"[{b['low']:.3f}, {b['high']:.3f}] b"
    low, high = stats.t_interval([r["summary"]["eval"]["after"].get(metric, np.nan) for r in found])
    return "–" if math.isnan(low) else f"[{low:.3f}, {high:.3f}] t"


def before_row(records: Path, name: str, problems: int | None = None) -> dict | None:
    """The untrained model's evaluation on `problems` held-out problems (any number: None), which
    the first recorded run of the task made (a run evaluates it once per task)."""
    found = (json.loads(p.read_text()) for p in sorted(records.glob("*.json")))
    return next((r["summary"]["eval"]["before"] for r in found if r["arm"] in ARMS and task(r["arm"]) == name
                 and "before" in r["summary"]["eval"]
                 and problems in (None, r["summary"]["config"]["data"]["eval_size"])), None)


def task_table(records: Path, name: str, arms: list[str], seeds: list[int]) -> str:
    """The held-out metrics (mean ± std over seeds, ddof=1; accuracy's 95% interval) and the
    training-time mechanism metrics of the arms of one task."""
    columns = HELD_OUT[name]
    ci = "accuracy" in columns
    lines = ["| arm | seeds | problems | " + " | ".join(LABELS[n] for n in columns) + " | "
             + ("pCoT acc. 95% CI | " if ci else "") + " | ".join(f"train: {LABELS.get(n, n)}" for n in TRAINING)
             + " |", "|---|---:|---:|" + "---:|" * (len(columns) + ci + len(TRAINING))]
    recorded = {a: found for a in arms if task(a) == name and (found := load(records, a, seeds))}
    sizes = {r["summary"]["config"]["data"]["eval_size"] for found in recorded.values() for r in found}
    before = before_row(records, name, sizes.pop() if len(sizes) == 1 else None)
    if before:
        lines.append("| before training | | | " + " | ".join(f"{before.get(n, float('nan')):.3f}" for n in columns)
                     + " |" + " |" * (ci + len(TRAINING)))
    for arm, found in recorded.items():
        problems = {r["summary"]["config"]["data"]["eval_size"] for r in found}
        held = [cell([r["summary"]["eval"]["after"].get(n, float("nan")) for r in found]) for n in columns]
        held += [interval(found, "accuracy", "correct")] if ci else []
        train = [cell([training_mean(r["metrics"], n) for r in found]) for n in TRAINING]
        lines.append(f"| {arm} | {len(found)} | {'/'.join(map(str, sorted(problems)))} | "
                     + " | ".join(held + train) + " |")
    return "\n".join(lines)


def difference(found: list[dict], base: list[dict], metric: str, name: str) -> dict:
    """The arm minus the baseline on their shared seeds: paired over problems and seeds (bootstrap)
    where both records hold per-problem outcomes, else paired by seed (Student t)."""
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in found if r["seed"] in by_seed]
    if not pairs:
        return {}
    mine, theirs = outcomes([a for a, _ in pairs], name), outcomes([b for _, b in pairs], name)
    if mine is not None and theirs is not None and mine.shape == theirs.shape:
        b = stats.bootstrap(mine, minus=theirs)
        return {"seeds": len(pairs), "mean": b["mean"], "low": b["low"], "high": b["high"], "se": b["se"],
                "dof": None, "method": "b"}
    deltas = [a["summary"]["eval"]["after"][metric] - b["summary"]["eval"]["after"][metric] for a, b in pairs]
    mean, sd = stats.mean_sd(deltas)
    low, high = stats.t_interval(deltas)
    return {"seeds": len(pairs), "mean": mean, "low": low, "high": high,
            "se": sd / math.sqrt(len(deltas)) if len(deltas) > 1 else float("nan"), "dof": len(deltas) - 1,
            "method": "t"}


def compare_table(records: Path, baseline: str, arms: list[str], seeds: list[int], metric: str = "accuracy",
                  name: str = "correct") -> str:
    """Each arm minus the baseline on one held-out metric, paired, with its 95% interval, the
    smallest difference the comparison could detect (80% power), and the noise floor: how far
    the no-hint control, which must change nothing, moved the metric from the untrained model."""
    base = load(records, baseline, seeds)
    lines = [f"| arm − {baseline} | paired seeds | {LABELS[metric]} difference | 95% CI | detectable (80% power) | "
             "reading |", "|---|---:|---:|---:|---:|---|"]
    for arm in arms:
        d = difference(load(records, arm, seeds), base, metric, name)
        if not d:
            lines.append(f"| {arm} | 0 | – | – | – | no shared seeds |")
            continue
        if math.isnan(d["low"]):
            ci, detectable, reading = "–", "–", "one seed: no interval"
        else:
            ci = f"[{d['low']:+.3f}, {d['high']:+.3f}] {d['method']}"
            detectable = f"{stats.detectable_difference(d['se'], d['dof']):.3f}"
            reading = ("higher" if d["low"] > 0 else "lower" if d["high"] < 0 else "inside the noise")
        lines.append(f"| {arm} | {d['seeds']} | {d['mean']:+.3f} | {ci} | {detectable} | {reading} |")
    control = load(records, "no-hint", seeds)
    before = before_row(records, task(baseline), control[0]["summary"]["config"]["data"]["eval_size"]) if control \
        else None
    if before and control:
        moved = [r["summary"]["eval"]["after"][metric] - before[metric] for r in control]
        low, high = stats.t_interval(moved)
        span = f", 95% CI [{low:+.3f}, {high:+.3f}]" if not math.isnan(low) else ""
        lines += ["", f"Noise floor: the no-hint control (its loss is ~0, so it must change nothing) moved "
                  f"{LABELS[metric]} by {np.mean(moved):+.3f} from the untrained model ({len(moved)} seed"
                  f"{'s' * (len(moved) > 1)}{span}). Intervals: b = bootstrap over problems and seeds, paired; "
                  "t = Student t over the seeds' paired differences."]
    return "\n".join(lines)


def end_gap_table(records: Path, arms: list[str], seeds: list[int]) -> str:
    """Per arm, over every training step of every recorded seed that has an ended sample: how
    often the target's p(end) sits below the student's where the sample ends, and the mean gap
    (target − student), overall and split by whether the sample had written its answer line."""
    lines = ["| arm | seeds | steps with an ended sample | target below student (by > 1e-6) | mean gap | "
             "gap, answer line written | gap, not yet |", "|---|---:|---:|---:|---:|---:|---:|"]

    def gaps(rows, suffix=""):
        pairs = [(r.get(f"end_p_target{suffix}"), r.get(f"end_p_student{suffix}")) for r in rows]
        return np.asarray([t - s for t, s in pairs if isinstance(t, float) and isinstance(s, float)
                           and not (math.isnan(t) or math.isnan(s))])

    for arm in arms:
        found = load(records, arm, seeds)
        if not found:
            continue
        rows = [m for r in found for m in r["metrics"]]
        every, answered, unanswered = gaps(rows), gaps(rows, "_answered"), gaps(rows, "_unanswered")
        mean = (lambda g: f"{round(g.mean(), 3) + 0.0:+.3f}" if g.size else "–")  # + 0.0: no "-0.000"
        lines.append(f"| {arm} | {len(found)} | {every.size} | {int((every < -1e-6).sum())} | {mean(every)} | "
                     f"{mean(answered)} | {mean(unanswered)} |")
    return "\n".join(lines)


def report(records: Path, arms: list[str], seeds: list[int], figures: Path) -> str:
    tables, curves = [], {}
    for name in HELD_OUT:
        chosen = [a for a in arms if task(a) == name and load(records, a, seeds)]
        if not chosen:
            continue
        tables.append(f"{name}:\n\n" + task_table(records, name, chosen, seeds))
        if name == "math":
            curves |= {arm: [r["metrics"] for r in load(records, arm, seeds)] for arm in chosen}
    plot(curves, figures)
    return "\n\n".join(tables)


def plot(curves: dict, figures: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return
    figures.mkdir(parents=True, exist_ok=True)
    panels = [("length", "sampled length (tokens)"), ("ended", "samples that end"),
              ("answer_line", "samples with '####'"), ("end_p_student", "p(end) where samples end: student"),
              ("end_gap", "p(end) there: target - student"), ("copy_solution_4gram", "4-gram copy of reference"),
              ("entropy_student", "student entropy (nats)"), ("reward", "training reward")]
    for arm_runs in curves.values():
        for rows in arm_runs:
            for r in rows:
                if isinstance(r.get("end_p_target"), float) and isinstance(r.get("end_p_student"), float):
                    r["end_gap"] = r["end_p_target"] - r["end_p_student"]
    # one colour per arm, the same in both figures (the default cycle repeats after 10 arms)
    colour = {arm: plt.cm.tab20.colors[i % 20] for i, arm in enumerate(curves)}
    fig, axes = plt.subplots(2, 4, figsize=(18, 7))
    for ax, (name, title) in zip(axes.flat, panels, strict=True):
        for arm, arm_runs in curves.items():
            steps = max(len(rows) for rows in arm_runs)
            values = np.full((len(arm_runs), steps), np.nan)
            for i, rows in enumerate(arm_runs):
                for j, r in enumerate(rows):
                    v = r.get(name)
                    values[i, j] = v if isinstance(v, (int, float)) else np.nan
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)  # over seeds, then a 4-step moving average (4 problems a step)
                smooth = [np.nanmean(mean[max(0, i - 3) : i + 1]) for i in range(steps)]
            ax.plot(np.arange(1, steps + 1), smooth, label=arm, color=colour[arm])
        ax.set_title(title + " (4-step mean)", fontsize=9)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "mechanism.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, arm_runs in curves.items():
        profiles = [r["kl_by_position"] for rows in arm_runs for r in rows if "kl_by_position" in r]
        if profiles:
            width = max(len(p) for p in profiles)
            stacked = np.array([p + [np.nan] * (width - len(p)) for p in profiles])
            with np.errstate(all="ignore"):
                ax.plot(16 * np.arange(width) + 8, np.nanmean(stacked, axis=0), marker="o", label=arm,
                        color=colour[arm])
    ax.set_xlabel("generated position")
    ax.set_ylabel("KL(target || student), nats")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:  # SFT arms have no KL profile
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "kl_by_position.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs/grid")
    parser.add_argument("--records", default="docs/results/grid", help="one JSON per finished run (committed)")
    parser.add_argument("--figures", help="where the plots go (default ROOT/figures; the docs' figures are redrawn "
                        "only when asked, with --figures=docs/results, so a run never edits committed files)")
    parser.add_argument("--report", action="store_true", help="no runs: only the table and the plots")
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    args = parser.parse_args()
    arms, seeds, root, records = args.arms.split(","), [int(s) for s in args.seeds.split(",")], Path(args.root), \
        Path(args.records)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if not args.report:
        for seed in seeds:  # every arm's seed 0 first, so a partial grid already compares every arm
            for arm in arms:
                run(root, records, arm, seed, args.override)
    print(report(records, arms, seeds, Path(args.figures) if args.figures else root / "figures"))


if __name__ == "__main__":
    main()
