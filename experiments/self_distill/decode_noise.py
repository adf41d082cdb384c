"""Why does the no-hint control, which must change nothing, move held-out accuracy a little?

    python experiments/self_distill/decode_noise.py --out=docs/results/decode_noise.json   # ~10 min on 2 cores
    python experiments/self_distill/decode_noise.py --runs=runs/grid256/no-hint-s2,runs/grid256/blend-s2 ...

The no-hint control's loss is ~1e-9 (the residual of the entropy match when teacher and student
see the same context), so its weights move about 1e-6 of their norm in 24 updates, yet on the
256 held-out problems its greedy answers differ from the untrained model's on about a dozen
problems per seed. This separates the candidates:

- the evaluation itself: the untrained model is evaluated again, exactly as training evaluates it
  (`distill.evaluate`'s batches of 32, greedy, 96 tokens), and compared answer by answer with the
  untrained evaluation recorded in docs/results/grid256/ (a rerun that differs means the decoding
  is not reproducible);
- any small change of the weights: the untrained weights plus Gaussian noise of a given size
  relative to each tensor's norm (the control's measured drift, and ten times it; --noise-seeds
  draws per size); the answers that change are compared with those the control changed;
- where the control's change sits: with --runs (finished training runs' directories), how far
  each kind of tensor moved from the loaded weights.

Only pCoT answers are decoded. The references are read to score answers, as the evaluation does;
nothing here decides anything at test time.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import runs, sampling, settings
from jaxdistill.data import load_records
from jaxdistill.data.records import answer_matches
from jaxdistill.distill.config import prompts_for
from jaxdistill.models import load
from jaxdistill.prompts import prompt_pair, stop_ids

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs/results/grid256"


def config_256():
    """The self-distillation default with the grid256 runs' 256 held-out problems."""
    config = settings.config_module(ROOT / "experiments/self_distill/default.py").get_config()
    config.data.eval_size = 256
    return config


def greedy_correct(model, tokenizer, records, prompt_config, batch_size: int) -> list[float]:
    """Each record's pCoT greedy answer right (1.0) or not, decoded in evaluate()'s batches."""
    gen = functools.partial(sampling.generate, model, max_new_tokens=96, eos_ids=stop_ids(tokenizer, prompt_config),
                            pad_id=tokenizer.pad_id)
    correct = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        student = gen([prompt_pair(tokenizer, r, prompt_config)[0] for r in chunk]).sequences()
        correct += [float(answer_matches(tokenizer.decode(s), r.answer)) for r, s in zip(chunk, student, strict=True)]
        print(f"  {min(start + batch_size, len(records))}/{len(records)}", flush=True)
    return correct


def perturbed(model, relative: float, seed: int):
    """A copy of `model` whose every parameter tensor w gets Gaussian noise of norm relative * |w|."""
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = []
    for w, key in zip(leaves, keys, strict=True):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            noisy.append(w)
            continue
        noise = jax.random.normal(key, w.shape, jnp.float32)
        scale = relative * jnp.linalg.norm(w.astype(jnp.float32)) / jnp.maximum(jnp.linalg.norm(noise), 1e-30)
        noisy.append((w + scale * noise).astype(w.dtype))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def recorded(arm: str, seed: int, when: str) -> list[float] | None:
    path = RECORDS / f"{arm}-s{seed}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["summary"]["per_problem"].get(when, {}).get("correct")


def changes(reference: list[float], other: list[float]) -> dict:
    ref, new = np.asarray(reference, bool), np.asarray(other, bool)
    return {"accuracy": float(new.mean()), "gained": np.flatnonzero(new & ~ref).tolist(),
            "lost": np.flatnonzero(ref & ~new).tolist()}


def drift(run: str, base) -> dict[str, dict]:
    """How far a finished run's parameters moved from `base`'s, per kind of tensor (layers stacked)."""
    def flat(model):
        return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
                for k, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}

    trained, _ = load(run)
    before, after = flat(base), flat(trained)
    kinds, total, moved, changed, count = {}, 0.0, 0, 0.0, 0
    for name, w in before.items():
        d = after[name] - w
        kind = name.replace(".value", "").replace("']['", ".").strip("[']")  # e.g. layers.wv
        kinds[kind] = {"relative": float(np.linalg.norm(d) / np.linalg.norm(w)), "max": float(np.abs(d).max()),
                       "moved": float((np.abs(d) > 1e-6).mean())}
        total, changed = total + float((w * w).sum()), changed + float((d * d).sum())
        moved, count = moved + int((np.abs(d) > 1e-6).sum()), count + d.size
    kinds["all"] = {"relative": (changed / total) ** 0.5, "max": max(k["max"] for k in kinds.values()),
                    "moved": moved / count}
    return kinds


def drift_table(result: dict) -> str:
    runs_ = list(result["drift"])
    kinds = list(result["drift"][runs_[0]])
    lines = ["| tensors | " + " | ".join(f"{Path(r).name}: relative change, max abs, share moved > 1e-6"
                                          for r in runs_) + " |", "|---|" + "---:|" * len(runs_)]
    for kind in ["all"] + [k for k in kinds if k != "all"]:
        cells = [result["drift"][r][kind] for r in runs_]
        lines.append(f"| {kind} | " + " | ".join(f"{c['relative']:.1e}, {c['max']:.1e}, {c['moved']:.3f}"
                                                  for c in cells) + " |")
    return "\n".join(lines)


def table(result: dict) -> str:
    """The record as markdown (scripts/docs_tables.py writes it into docs/results.md)."""
    before = result["recorded_before"]
    rows = [("untrained, recorded (blend-s0's evaluation before training)", changes(before, before))]
    rows.append(("untrained, evaluated again in a fresh process", changes(before, result["untrained"])))
    for name, correct in result["noise"].items():
        rows.append((f"untrained + noise, {name}", changes(before, correct)))
    for name, correct in result["controls"].items():
        rows.append((f"no-hint control {name} (recorded)", changes(before, correct)))
    lines = ["| weights | pCoT accuracy | answers changed | right now, wrong before | wrong now, right before |",
             "|---|---:|---:|---|---|"]
    for name, c in rows:
        show = lambda ids: ", ".join(map(str, ids)) if ids else "–"  # noqa: E731
        lines.append(f"| {name} | {c['accuracy']:.3f} | {len(c['gained']) + len(c['lost'])} | "
                     f"{len(c['gained'])}: {show(c['gained'])} | {len(c['lost'])}: {show(c['lost'])} |")
    lines.append(f"\nProblems are numbered 0-255 in evaluation order; noise is Gaussian, its norm a fraction of each "
                 f"tensor's norm; {result['noise_seeds']} noise seed(s) per size.")
    if result.get("drift"):
        lines += ["", "Where the weights moved (from the loaded model; layers stacked):", "", drift_table(result)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relative", default="2.3e-6,2.3e-5", help="noise sizes, relative to each tensor's norm")
    parser.add_argument("--noise-seeds", type=int, default=1)
    parser.add_argument("--runs", default="", help="finished training runs whose weight change to measure")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    config = config_256()
    train_records, eval_records = load_records(config.data)
    prompt_config = prompts_for(config, train_records)
    before = recorded("blend", 0, "before")
    if before is None or len(before) != len(eval_records):
        raise SystemExit(f"{RECORDS}/blend-s0.json holds no 256-problem evaluation before training: run the "
                         "grid256 command in docs/results.md first.")
    model, tokenizer = load(config.model, dtype=config.dtype)
    batch = config.eval.batch_size
    print("untrained, again:", flush=True)
    result = {"commit": runs.source_commit(), "problems": len(eval_records), "noise_seeds": args.noise_seeds,
              "recorded_before": before, "untrained": greedy_correct(model, tokenizer, eval_records, prompt_config,
                                                                     batch), "noise": {}, "controls": {}}
    for relative in (float(r) for r in args.relative.split(",")):
        for seed in range(args.noise_seeds):
            name = f"{relative:.1e} of the norm, seed {seed}"
            print(f"untrained + noise, {name}:", flush=True)
            result["noise"][name] = greedy_correct(perturbed(model, relative, seed), tokenizer, eval_records,
                                                   prompt_config, batch)
    result["drift"] = {run: drift(run, model) for run in filter(None, args.runs.split(","))}
    for seed in range(3):
        correct = recorded("no-hint", seed, "after")
        if correct is not None:
            result["controls"][f"seed {seed}"] = correct
    print(table(result))
    if args.out:
        runs.atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
