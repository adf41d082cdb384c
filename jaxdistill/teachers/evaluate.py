"""The teacher stack's own evaluation: diversity (every teacher scoring the reference solutions at
once: pairwise Jensen-Shannon, top-1 agreement, where the aggregate differs from each teacher),
the per-prompt perplexity that the perplexity rule weighs by, and the summary table of the
`teachers` command."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import sampling, stats
from jaxdistill.teachers.stack import TeacherStack


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_logprobs(graphdef, state, tokens, mask):
    logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens, mask=mask)[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0] * mask[:, 1:]


def nll_per_byte(model, tokenizer, texts) -> np.ndarray:
    """Each text's negative log-likelihood per UTF-8 byte (comparable across vocabularies)."""
    ids = [tokenizer.encode(t) for t in texts]
    length = sampling.bucket(max(len(i) for i in ids))
    tokens = np.full((len(ids), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), bool)
    for r, i in enumerate(ids):
        tokens[r, : len(i)], mask[r, : len(i)] = i, True
    graphdef, state = nnx.split(model)
    logp = np.asarray(_token_logprobs(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask)))
    return -logp.sum(axis=1) / np.asarray([max(len(t.encode()), 1) for t in texts])


def measure_diversity(stack: TeacherStack, records, batch_size: int) -> dict:
    """Per-position averages over the reference solutions scored under every teacher's prompt."""
    totals = None
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        forced = [stack.pivot.encode(r.solution, add_special_tokens=False) for r in batch]
        stats = stack.score(batch, forced, top_k=0, diversity=True).stats
        totals = stats if totals is None else {k: totals[k] + stats[k] for k in stats}
    n = float(totals["positions"])
    return {"positions": n, "js": totals["js"] / n, "agree": totals["agree"] / n,
            "entropy_gain": float(totals["entropy_gain"]) / n, "differs": totals["differs"] / n}


def plot_diversity(diversity: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(names), 3 + 0.4 * len(names)))
    for ax, key, title, cmap in ((axes[0], "js", "Jensen-Shannon divergence (nats)", "magma_r"),
                                 (axes[1], "agree", "top-1 agreement", "viridis")):
        m = np.asarray(diversity[key])
        image = ax.imshow(m, cmap=cmap, vmin=0, vmax=np.log(2) if key == "js" else 1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white" if (v > 0.5) == (key == "js") else
                    "black", fontsize=8)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"Teacher diversity on reference solutions ({int(diversity['positions'])} positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(config, pivot, results, diversity, names, best, excluded, seconds) -> str:
    lines = [f"# Teacher stack on {config.data.eval_size} held-out synthetic problems", "",
             f"teachers: {', '.join(names)}; pivot vocabulary of {pivot}; "
             f"top-{config.top_k} candidates; width {config.width} (pivot tokens excluded per teacher: {excluded}); "
             f"{'greedy' if config.temperature == 0 else f'temperature {config.temperature}'}; "
             f"{len(next(iter(results.values())))} seed(s)", "",
             "| arm | accuracy | tokens generated | seconds |", "|---|---|---|---|"]
    for arm, rows in results.items():
        mean, sd = stats.mean_sd([r["accuracy"] for r in rows])
        spread = f" ± {sd:.3f}" if len(rows) > 1 else ""
        lines.append(f"| {arm} | {mean:.3f}{spread} | {np.mean([r['tokens'] for r in rows]):.0f} | "
                     f"{np.mean([r['seconds'] for r in rows]):.0f} |")
    best_acc = np.mean([r["accuracy"] for r in results[f"alone: {names[best]}"]])
    stack_best = max((a for a in results if a.startswith("stack")), default=None,
                     key=lambda a: np.mean([r["accuracy"] for r in results[a]]))
    if stack_best:
        gap = np.mean([r["accuracy"] for r in results[stack_best]]) - best_acc
        lines += ["", f"Best single teacher: {names[best]} ({best_acc:.3f}). Best rule: {stack_best} "
                      f"({gap:+.3f} against it)."]
    lines += ["", "Diversity:", "", diversity_table({"teachers": names, "diversity": diversity,
                                                     "best_single": names[best]}),
              "", f"Total time {seconds:.0f}s."]
    return "\n".join(lines)


ORACLE = "oracle: any single teacher right (reads the labels)"


def oracle_correct(results: dict, names: list[str]) -> list[list[bool]]:
    """Per seed and problem: does any teacher alone answer it right? An upper bound that reads the
    held-out answers (it knows which member to trust), never a test-time decision."""
    per_teacher = np.asarray([[row["correct"] for row in results[f"alone: {name}"]] for name in names], bool)
    return per_teacher.any(axis=0).tolist()


def comparison_table(record: dict) -> str:
    """Accuracy of every arm of a `teachers` run's results.json, with paired differences (bootstrap
    over seeds and problems, 95%) and exact McNemar p against three baselines: the best single
    teacher as chosen on training problems (the protocol), the best in hindsight (the member best
    on these problems: a stricter bar) and the any-member-right oracle."""
    arms = {arm: np.asarray(row["correct"], float) for arm, row in record["arms"].items()}
    arms[ORACLE] = np.asarray(record["oracle"]["correct"], float)
    singles = [arm for arm in arms if arm.startswith("alone: ")]
    chosen, hindsight = f"alone: {record['best_single']}", max(singles, key=lambda arm: arms[arm].mean())
    seeds, problems = arms[ORACLE].shape
    lines = [f"{problems} held-out problems x {seeds} seed(s). Baselines: best single chosen on training problems "
             f"({chosen[7:]}), best single in hindsight ({hindsight[7:]}), the oracle. Differences paired, 95% "
             "bootstrap over seeds and problems; p: exact McNemar.", "",
             "| arm | accuracy | right | vs chosen single | p | vs single in hindsight | p | vs oracle | p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, x in arms.items():
        cells = []
        for baseline in (chosen, hindsight, ORACLE):
            if arm == baseline:
                cells += ["", ""]
                continue
            d = stats.bootstrap(x, minus=arms[baseline])
            cells += [f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                      f"{stats.mcnemar_exact(x, arms[baseline]):.3f}"]
        lines.append(f"| {arm} | {x.mean():.3f} | {int(x.sum())}/{x.size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diversity_table(record: dict) -> str:
    """Every pair of teachers on the reference solutions of a `teachers` run's results.json:
    Jensen-Shannon divergence and top-1 agreement, then the mixture's entropy gain and how often
    its top token differs from the chosen single teacher's."""
    names, diversity = record["teachers"], record["diversity"]
    js, agree = np.asarray(diversity["js"]), np.asarray(diversity["agree"])
    lines = [f"{int(diversity['positions'])} positions of the reference solutions, pivot vocabulary.", "",
             "| pair | Jensen-Shannon (nats) | top-1 agreement |", "|---|---:|---:|"]
    lines += [f"| {names[i]} vs {names[j]} | {js[i, j]:.3f} | {agree[i, j]:.2f} |"
              for i in range(len(names)) for j in range(i + 1, len(names))]
    lines += ["", f"Mixture entropy minus the members' mean entropy: {diversity['entropy_gain']:.3f} nats. "
                  f"Positions where the mixture's top token differs from the chosen single teacher's "
                  f"({record['best_single']}): {diversity['consensus_differs_from_best']:.2f}."]
    return "\n".join(lines)
