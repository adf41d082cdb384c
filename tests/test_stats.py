"""The report statistics (jaxdistill/stats.py) and the docs tables written from records
(scripts/docs_tables.py): intervals that cover what they claim, pairing that removes shared
noise, and a check that fails when a doc's table is no longer what its records give."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxdistill import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_tables  # noqa: E402


def test_spreads_are_sample_standard_deviations_and_t_intervals():
    mean, sd = stats.mean_sd([0.1, 0.2, 0.6, float("nan")])
    assert mean == pytest.approx(0.3) and sd == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert np.isnan(stats.mean_sd([0.5])[1])
    low, high = stats.t_interval([0.1, 0.2, 0.6])
    half = scipy_stats.t.ppf(0.975, 2) * sd / np.sqrt(3)
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half))
    # 80% power at 5%: a difference of 2.8 standard errors (normal), more with few degrees of freedom
    assert stats.detectable_difference(1.0) == pytest.approx(2.8016, abs=1e-3)
    assert stats.detectable_difference(1.0, dof=2) > 5


def test_the_bootstrap_covers_the_normal_interval_and_pairing_removes_what_arms_share():
    rng = np.random.default_rng(0)
    outcomes = (rng.random((3, 400)) < 0.3).astype(float)  # 3 seeds x 400 problems, accuracy 0.3
    b = stats.bootstrap(outcomes)
    se = np.sqrt(0.3 * 0.7 / outcomes.size)
    assert b["low"] < outcomes.mean() < b["high"]
    # resampling seeds counts the problems' noise a second time (each seed's mean carries it):
    # conservative, at most about sqrt(2) x the binomial error when seeds are independent
    assert se < b["se"] < 1.6 * se
    # two arms that share most of their outcomes (the same easy and hard problems): the paired
    # interval is far narrower than the difference of the unpaired ones
    other = outcomes.copy()
    flips = rng.random(outcomes.shape) < 0.05
    other[flips] = 1 - other[flips]
    paired = stats.bootstrap(other, minus=outcomes)
    unpaired_se = np.hypot(stats.bootstrap(other)["se"], b["se"])
    assert paired["se"] < unpaired_se / 2 and paired["low"] <= paired["mean"] <= paired["high"]
    assert stats.bootstrap(outcomes, minus=outcomes)["high"] == 0.0
    with pytest.raises(ValueError, match="same seeds and problems"):
        stats.bootstrap(outcomes, minus=outcomes[:, :10])


def test_docs_tables_equal_their_records_and_a_changed_cell_is_caught(tmp_path, capsys):
    """What CI runs (`scripts/docs_tables.py --check`), and that it would fail on a stale number."""
    assert docs_tables.main(["--check"]) == 0
    doc = tmp_path / "results.md"
    shutil.copy(ROOT / "docs/results.md", doc)
    text = doc.read_text()
    marker = "<!-- table: grid task=math arms=sft,blend-frozen,lora-base seeds=0,1,2 -->"
    start = text.index(marker)
    row = text.index("| lora-base | 3 | 64 | 0.120", start)
    doc.write_text(text[:row] + text[row:].replace("| 0.120 ± ", "| 0.130 ± ", 1))
    assert docs_tables.main(["--check", str(doc)]) == 1
    assert "lora-base seeds=0,1,2` differs from its records" in capsys.readouterr().out
    assert docs_tables.main([str(doc)]) == 0 and doc.read_text() == text  # rewriting restores it
    # a typed table that is neither generated nor marked as a transcript fails the check
    doc.write_text(text + "\nNew numbers:\n\n| arm | accuracy |\n|---|---:|\n| blend | 0.9 |\n")
    assert docs_tables.main(["--check", str(doc)]) == 1
    assert f"results.md:{len(text.splitlines()) + 4}: a table neither generated" in capsys.readouterr().out
    doc.write_text(text + "\n<!-- transcript, records lost: a test -->\n| arm | accuracy |\n|---|---:|\n")
    assert docs_tables.main(["--check", str(doc)]) == 0


def test_grid_records_pair_per_problem_outcomes_and_name_their_commit(tmp_path):
    """New records hold each problem's outcome; the report bootstraps them, paired by seed and problem."""
    grid = docs_tables._module(ROOT / "experiments/self_distill/grid.py")
    rng = np.random.default_rng(1)
    base = (rng.random((3, 256)) < 0.3).astype(float)
    better = np.maximum(base, (rng.random((3, 256)) < 0.2).astype(float))  # never worse, often better
    for arm, per_seed in (("blend", base), ("sft", better)):
        for seed, correct in enumerate(per_seed):
            summary = {"config": {"data": {"eval_size": 256}}, "commit": "abc",
                       "eval": {"after": {"accuracy": float(correct.mean())}},
                       "per_problem": {"after": {"correct": correct.tolist()}}}
            record = {"arm": arm, "seed": seed, "commit": "abc", "summary": summary, "metrics": []}
            grid.record_path(tmp_path, arm, seed).write_text(json.dumps(record))
    table = grid.compare_table(tmp_path, "blend", ["sft"], [0, 1, 2])
    difference = (better - base).mean()
    assert f"| sft | 3 | +{difference:.3f} | [+" in table and "] b |" in table and "| higher |" in table
    assert "] b |" in grid.task_table(tmp_path, "math", ["blend", "sft"], [0, 1, 2])


def test_end_gap_table_counts_steps_where_the_target_is_below_the_student(tmp_path):
    grid = docs_tables._module(ROOT / "experiments/self_distill/grid.py")
    nan = float("nan")
    steps = [  # (target, student) where samples end, then the answered / not-yet split
        dict(end_p_target=0.30, end_p_student=0.40, end_p_target_answered=0.5, end_p_student_answered=0.6,
             end_p_target_unanswered=nan, end_p_student_unanswered=nan),
        dict(end_p_target=0.50, end_p_student=0.45, end_p_target_answered=nan, end_p_student_answered=nan,
             end_p_target_unanswered=0.5, end_p_student_unanswered=0.45),
        dict(end_p_target=nan, end_p_student=nan),  # no sample ended at this step
        dict(end_p_target=0.2, end_p_student=0.2 + 1e-9),  # numerically equal: not "below"
    ]
    record = {"arm": "blend", "seed": 0, "commit": "abc", "summary": {}, "metrics": steps}
    grid.record_path(tmp_path, "blend", 0).write_text(json.dumps(record))
    row = grid.end_gap_table(tmp_path, ["blend", "sft"], [0, 1]).splitlines()[2:]
    assert row == ["| blend | 1 | 3 | 1 | -0.017 | -0.100 | +0.050 |"]


def test_mcnemar_and_the_teachers_table_compare_arms_problem_by_problem():
    from jaxdistill.teachers.evaluate import ORACLE, comparison_table, oracle_correct

    # 6 problems only the second arm gets right, none only the first: p = 2 / 2**6
    assert stats.mcnemar_exact([1, 0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1]) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0
    rng = np.random.default_rng(0)
    right = {name: rng.random((1, 40)) < p for name, p in (("a", 0.3), ("b", 0.5))}
    results = {f"alone: {name}": [{"correct": row.tolist()} for row in rows] for name, rows in right.items()}
    record = {"arms": {arm: {"correct": [r["correct"] for r in rows]} for arm, rows in results.items()},
              "best_single": "b", "oracle": {"correct": oracle_correct(results, ["a", "b"])}}
    record["arms"]["stack: copy of b"] = record["arms"]["alone: b"]
    assert np.asarray(record["oracle"]["correct"]).sum() == (right["a"] | right["b"]).sum()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in comparison_table(record).splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["stack: copy of b"][3:5] == ["+0.000 [+0.000, +0.000]", "1.000"]  # same answers: no difference
    gap = (right["b"] | right["a"]).mean() - right["b"].mean()
    assert rows[ORACLE][1] == f"{(right['a'] | right['b']).mean():.3f}" and rows["alone: b"][7].startswith(
        f"{-gap:+.3f}")
    # b is also the best in hindsight; chosen on training problems, a would be the first baseline
    assert rows["alone: a"][5].startswith(f"{right['a'].mean() - right['b'].mean():+.3f}")
    record["best_single"] = "a"
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in comparison_table(record).splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["alone: b"][3].startswith(f"{right['b'].mean() - right['a'].mean():+.3f}") and rows["alone: b"][5] == ""


def test_traces_sft_table_comes_from_its_record_with_seed_spreads_and_the_paired_gap(tmp_path):
    """experiments/teachers/traces_sft.py's results.json alone gives its docs table (generator traces-sft)."""
    rng = np.random.default_rng(2)
    correct = {"search": rng.random((3, 64)) < 0.5, "best_of_n": rng.random((3, 64)) < 0.4}
    record = {"sets": [{"seed": s, "examples": 42, "search_gold": 42, "problems_with_search_gold": 19,
                        "best_of_n_gold": 44, "problems_with_best_of_n_gold": 21,
                        "search_tokens": 3271, "best_of_n_tokens": 3500} for s in range(3)],
              "runs": {name: [{"seed": s, "commit": "abc", "per_problem": {"correct": c[s].tolist()},
                               "eval": {"accuracy": float(c[s].mean()), "accuracy_teacher": 0.9, "length": 20.0}}
                              for s in range(3)] for name, c in correct.items()}}
    (tmp_path / "results.json").write_text(json.dumps(record))
    table = docs_tables.generate(f"traces-sft record={tmp_path / 'results.json'}")
    accuracy = correct["search"].mean(axis=1)
    mean, sd = accuracy.mean(), accuracy.std(ddof=1)
    seeds = ", ".join(f"{a:.3f}" for a in accuracy)
    assert f"| search | 3 | {mean:.3f} ± {sd:.3f} ({seeds}) | 0.900 ± 0.000 (" in table
    gap = (correct["search"].astype(float) - correct["best_of_n"]).mean()
    assert f"search minus best-of-N, pCoT accuracy: {gap:+.3f} [" in table and "3 seed(s) and 64 problems" in table
