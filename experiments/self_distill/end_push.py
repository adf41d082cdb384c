"""Does the self-teacher's target push against ending, or is "the end push" a selection effect?

    python experiments/self_distill/end_push.py                   # 256 training problems, ~12 min on 2 cores
    python experiments/self_distill/end_push.py --out=docs/results/end_push.json

The training metric "p(end) target there" is read only where the student itself sampled the end
token. Those positions are chosen for a high student p(end), so any target that differs from the
student at all (not only one that pushes against ending) reads lower there: regression to the
mean. This measures, on the untrained model's on-policy samples (pCoT, temperature 0.7, up to 96
tokens, as in training), the student's and the target's p(end) (end = any stop token) at every
generated position, split three ways:

- where the sample ended (the training metric);
- the mirror: every position where it did not end (a selection toward low student p(end));
- binned by the student's p(end), over all positions, so both selections cancel.

Targets: the method's blend (0.75 teacher + student)/k with k matched to the student's entropy,
and the hinted teacher alone. Intervals: bootstrap over samples (positions of one sample move
together). The problems are training problems: nothing here reads held-out data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import runs, sampling, stats
from jaxdistill.data.synthetic import SyntheticConfig, synthetic_records
from jaxdistill.distill.targets import blend_logits
from jaxdistill.models import load
from jaxdistill.prompts import PromptConfig, prompt_pair, stop_ids

BINS = (0.0, 0.001, 0.01, 0.1, 0.3, 0.6, 1.0)  # student p(end)


def logits_at_samples(model, prompts, samples, pad_id: int, length: int) -> jax.Array:
    """[B, length, V]: the logits that predict each sampled token (position j predicts samples[i][j])."""
    width = max(len(p) for p in prompts) + length
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, (p, s) in enumerate(zip(prompts, samples, strict=True)):
        tokens[i, : len(p) + len(s)] = p + s
    full = model(jnp.asarray(tokens))
    return jnp.stack([full[i, len(p) - 1 : len(p) - 1 + length] for i, p in enumerate(prompts)])


def table(result: dict) -> str:
    """The record as markdown (scripts/docs_tables.py writes it into docs/results.md)."""
    ci = lambda row, name: "[{:+.3f}, {:+.3f}]".format(*row[f"{name}_minus_student_ci"])  # noqa: E731
    lines = ["| positions | count | samples | student p(end) | blend p(end) | blend − student [95% CI] | "
             "teacher p(end) | teacher − student [95% CI] | samples that end here |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(name, row, "") for name, row in result["where"].items()]
    rows += [(f"student p(end) in [{b['student_p_end'][0]}, {b['student_p_end'][1]})", b, b["ended_here"])
             for b in result["bins"]]
    for name, row, ended in rows:
        if not row["positions"]:
            lines.append(f"| {name} | 0 | | | | | | | {ended} |")
            continue
        lines.append(f"| {name} | {row['positions']} | {row['samples']} | {row['student']:.3f} | {row['blend']:.3f} "
                     f"| {row['blend_minus_student']:+.3f} {ci(row, 'blend')} | {row['teacher']:.3f} | "
                     f"{row['teacher_minus_student']:+.3f} {ci(row, 'teacher')} | {ended} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    model, tokenizer = load("smollm2-135m-instruct")
    config = PromptConfig()
    stops = sorted(stop_ids(tokenizer, config))
    records = synthetic_records(args.problems, args.seed, SyntheticConfig(steps=1, max_start=20, max_operand=12))
    pairs = [prompt_pair(tokenizer, r, config) for r in records]

    @jax.jit
    def p_end(student_logits, teacher_logits):  # [B, T, V] each -> p(end) [B, T] for student, blend, teacher
        target = blend_logits(teacher_logits, student_logits)
        mass = lambda z: jnp.exp(jax.nn.log_softmax(z, axis=-1)[..., jnp.asarray(stops)]).sum(-1)  # noqa: E731
        return mass(student_logits), mass(target), mass(teacher_logits)

    rows = []  # per sample: (student, blend, teacher) p(end) per generated position, ended flag
    for start in range(0, len(records), args.batch):
        chunk = pairs[start : start + args.batch]
        samples = sampling.generate(model, [p[0] for p in chunk], max_new_tokens=96,
                                    rule=sampling.Sample(temperature=0.7), rng=args.seed + start, eos_ids=stops,
                                    pad_id=tokenizer.pad_id).sequences()
        samples = [s if s else [stops[0]] for s in samples]
        logits = {name: logits_at_samples(model, [p[column] for p in chunk], samples, tokenizer.pad_id, 96)
                  for name, column in (("student", 0), ("teacher", 1))}
        student, blend, teacher = (np.asarray(x) for x in p_end(logits["student"], logits["teacher"]))
        for i, s in enumerate(samples):
            n = len(s)
            rows.append({"student": student[i, :n], "blend": blend[i, :n], "teacher": teacher[i, :n],
                         "ended": s[-1] in stops})
        print(f"scored {min(start + args.batch, len(records))}/{len(records)} problems", flush=True)

    result = {"commit": runs.source_commit(), "problems": len(records),
              "positions": int(sum(len(r["student"]) for r in rows)),
              "samples_ended": int(sum(r["ended"] for r in rows)), "where": {}, "bins": []}

    def summarize(select) -> dict:
        """Means over the selected positions, with the target - student difference's interval
        (bootstrap over samples: each sample's selected positions form one unit)."""
        per_sample = [(r, select(r)) for r in rows]
        per_sample = [(r, m) for r, m in per_sample if m.any()]
        if not per_sample:
            return {"positions": 0}
        out = {"positions": int(sum(m.sum() for _, m in per_sample)), "samples": len(per_sample)}
        for name in ("student", "blend", "teacher"):
            out[name] = float(np.concatenate([r[name][m] for r, m in per_sample]).mean())
        for name in ("blend", "teacher"):  # ratio estimator: resample samples, keep their position counts
            sums = np.array([(r[name][m] - r["student"][m]).sum() for r, m in per_sample])
            counts = np.array([m.sum() for _, m in per_sample], np.float64)
            draws = np.random.default_rng(0).integers(0, len(sums), size=(stats.DRAWS, len(sums)))
            means = sums[draws].sum(1) / counts[draws].sum(1)
            out[f"{name}_minus_student"] = float(sums.sum() / counts.sum())
            out[f"{name}_minus_student_ci"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
        return out

    last = lambda r: np.arange(len(r["student"])) == len(r["student"]) - 1  # noqa: E731
    result["where"]["sample ended"] = summarize(lambda r: last(r) & r["ended"])
    result["where"]["did not end (mirror)"] = summarize(lambda r: ~(last(r) & r["ended"]))
    result["where"]["every position"] = summarize(lambda r: np.ones(len(r["student"]), bool))
    for low, high in zip(BINS[:-1], BINS[1:], strict=True):  # the last bin includes p(end) = 1
        found = summarize(lambda r, low=low, high=high: (r["student"] >= low) & (r["student"] < high + (high == 1)))
        ended = sum(int((last(r) & r["ended"] & (r["student"] >= low) & (r["student"] < high + (high == 1))).sum())
                    for r in rows)
        result["bins"].append({"student_p_end": [low, high], "ended_here": ended, **found})
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
