"""Learned pruning: replaying recorded search trees is the live search, and PPO learns from it."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from helpers import read_board

from jaxdistill.data.synthetic import synthetic_records
from jaxdistill.rl import ppo
from jaxdistill.teachers import aggregate as agg
from jaxdistill.teachers import pruning_env
from jaxdistill.teachers import search as search_lib
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block


def _saved(result: search_lib.SearchResult) -> dict:
    """What `teachers.run.search_saved` writes, through JSON."""
    return json.loads(json.dumps({"uid": result.record.uid, "tokens": result.tokens, "pruned": result.pruned,
                                  "seconds": 0.0, "leaves": result.leaves,
                                  "branches": [dataclasses.asdict(b) for b in result.branches]}))


def test_replaying_a_recorded_tree_is_the_live_search(tiny_smollm2):
    """Expand-everything replays the complete search's tokens and gold; consensus-only is the stack's greedy
    decode; the confidence pruner replays a live search run with that min_confidence (the replay's
    machinery, on SmolLM2's tokenizer with small random weights)."""
    stack = TeacherStack([TeacherConfig("chat", "smollm2"), TeacherConfig("fewshot", "smollm2", style="fewshot")],
                         loaded={"smollm2": tiny_smollm2}, fewshot=fewshot_block(synthetic_records(2, 0)))
    record = synthetic_records(1, 5, split="test")[0]
    complete = search_lib.SearchConfig(right=2, wrong=1, branch_entropy=0.8, gap=4, max_levels=2, max_live=9,
                                       token_budget=9 * 24, max_new_tokens=24)
    full = search_lib.search(stack, record, complete, aggregate=agg.MeanProbs())
    assert full.pruned == 0 and len(full.leaves) >= 4  # it branched on both levels
    trees = pruning_env.trees_from_searches([_saved(full)], complete)

    everything = pruning_env.replay(trees, pruning_env.constant(pruning_env.EXPAND))
    assert everything["tokens"][0] == full.tokens
    assert everything["gold"][0] == sum(leaf["correct"] for leaf in full.leaves)

    greedy = stack.run([record], aggregate=agg.MeanProbs(), max_new_tokens=24)
    consensus = pruning_env.replay(trees, pruning_env.constant(pruning_env.CONTINUE))
    assert consensus["tokens"][0] == greedy.mask[0].sum()
    branch = 0  # follow child 0 down the tree: its leaf is the greedy text
    while (kids := [b.id for b in full.branches if b.parent == branch]):
        branch = kids[0]
    leaf = next(leaf for leaf in full.leaves if leaf["branch"] == branch)
    assert leaf["tokens"] == greedy.tokens[0, : greedy.mask[0].sum()].tolist()

    pruned = pruning_env.replay(trees, pruning_env.constant(pruning_env.PRUNE))
    assert pruned["tokens"][0] == full.branches[0].features["tokens"]

    confidences = sorted(b.features["confidence"] for b in full.branches if b.features and b.features["tokens"])
    threshold = confidences[len(confidences) // 2]  # prunes some branches, keeps others
    live = search_lib.search(stack, record, dataclasses.replace(complete, min_confidence=threshold),
                             aggregate=agg.MeanProbs())
    replayed = pruning_env.replay(trees, pruning_env.confidence_pruner(threshold))
    assert 0 < live.pruned and live.tokens < full.tokens
    assert replayed["tokens"][0] == live.tokens
    assert replayed["gold"][0] == sum(leaf["correct"] for leaf in live.leaves)
    # and the replay knows which leaves it decoded: exactly the live search's (distinct gold texts come from them)
    reached = pruning_env.leaves_reached(trees, replayed)[0]
    assert sorted(leaf["tokens"] for leaf in full.leaves if reached[leaf["branch"]]) == sorted(
        leaf["tokens"] for leaf in live.leaves)
    assert pruning_env.leaves_reached(trees, everything)[0].sum() == len(full.leaves)


def _toy_tree(uid: str, pays: bool, rng) -> dict:
    """A root that pauses after 5 tokens, two right children (60 tokens, wrong answers) and one wrong-direction
    child (20 tokens) that is verified only when `pays`; `agreement` tells the two kinds apart, the other
    features are noise."""
    features = {k: float(rng.uniform()) for k in ("top1", "top2", "entropy", "confidence")}
    root = {"id": 0, "parent": -1, "kind": "root", "level": 0, "position": 0, "length": 5,
            "features": features | {"agreement": 0.0 if pays else 1.0, "tokens": 5}}
    kids = [{"id": i, "parent": 0, "kind": kind, "level": 1, "position": 5, "length": 5 + n, "features": None}
            for i, kind, n in ((1, "right", 60), (2, "right", 60), (3, "wrong", 20))]
    leaves = [{"branch": i, "correct": bool(pays and i == 3)} for i in (1, 2, 3)]
    return {"uid": uid, "tokens": 145, "pruned": 0, "seconds": 0.0, "leaves": leaves, "branches": [root, *kids]}


def test_ppo_learns_to_expand_only_where_the_wrong_direction_pays():
    """Expanding costs 140 tokens: worth it (+1 gold) on half the problems, which a feature reveals. At a price
    of 5 per 1,000 tokens the best policy expands those and prunes the rest; PPO finds it on held-out trees."""
    rng = np.random.default_rng(0)
    config = search_lib.SearchConfig(right=2, wrong=1, max_levels=1, max_live=3, max_new_tokens=96)
    train = pruning_env.trees_from_searches([_toy_tree(f"t{i}", i % 2 == 0, rng) for i in range(16)], config)
    test = pruning_env.trees_from_searches([_toy_tree(f"h{i}", i % 2 == 0, rng) for i in range(8)], config)
    np.testing.assert_array_equal(pruning_env.replay(test, pruning_env.constant(pruning_env.EXPAND))["tokens"], 145.0)
    np.testing.assert_array_equal(pruning_env.replay(test, pruning_env.constant(pruning_env.CONTINUE))["tokens"], 65.0)

    ppo_config = ppo.PPOConfig(num_envs=16, num_steps=8, total_timesteps=16_384, hidden=(16,), discount=1.0,
                                lr=1e-3)
    train_fn = ppo.make_train(ppo_config, train, pruning_env.Price(), dynamics=pruning_env)
    states, history = jax.jit(train_fn)(jax.random.key(0), 5.0, train)
    params = states.params
    graphdef = ppo.policy_graph(train, ppo_config)
    learned = lambda obs: jax.numpy.argmax(ppo.apply(graphdef, params, obs)[0])  # noqa: E731
    out = pruning_env.replay(test, learned)
    # held-out references replaced by garbage: the same decisions (the policy never sees a label),
    # while what the decisions earn (gold traces) changes
    garbage = test.replace(gold=jax.numpy.asarray(rng.random(test.gold.shape) < 0.5))
    fooled = pruning_env.replay(garbage, learned)
    np.testing.assert_array_equal(fooled["actions"], out["actions"])
    np.testing.assert_array_equal(fooled["tokens"], out["tokens"])
    assert not np.array_equal(fooled["gold"], out["gold"]) and (out["actions"] >= 0).any()
    pays = np.arange(8) % 2 == 0
    np.testing.assert_array_equal(out["gold"], pays.astype(np.float32))  # expanded exactly where it pays
    np.testing.assert_array_equal(out["tokens"], np.where(pays, 145.0, 5.0))  # and pruned the rest
    assert history["episode_return"][-1] > history["episode_return"][0]


def test_best_of_n_replayed_at_exact_tokens_with_the_search_pruner():
    from jaxdistill.teachers.traces import matched_best_of_n

    row = {"gold_texts": ["x = 4\n#### 4", "x = 4 \n#### 4", "y\n#### 4"], "samples": [
        {"tokens": 4, "correct": True, "top_p": [0.9, 0.9, 0.9, 0.9]},
        {"tokens": 4, "correct": False, "top_p": [0.9, 0.1, 0.1, 0.1]},  # running mean 0.5 after 2 tokens
        {"tokens": 3, "correct": True, "top_p": [0.9, 0.8, 0.9]},  # the same text as the first, spacing aside
        {"tokens": 5, "correct": True, "top_p": [0.2, 0.9, 0.9, 0.9, 0.9]},  # below 0.6 at its first token
    ]}
    assert matched_best_of_n(row, 100) == {"gold": 3, "distinct": 2, "tokens": 16}  # samples ran out
    assert matched_best_of_n(row, 12) == {"gold": 2, "distinct": 1, "tokens": 12}  # the 4th crosses: cut, not gold
    assert matched_best_of_n(row, 14) == {"gold": 2, "distinct": 1, "tokens": 14}
    # the pruner stops the 2nd sample after 2 tokens and the 4th after 1; they are not gold
    assert matched_best_of_n(row, 100, min_confidence=0.6) == {"gold": 2, "distinct": 1, "tokens": 4 + 2 + 3 + 1}
    assert matched_best_of_n(row, 8, min_confidence=0.6) == {"gold": 1, "distinct": 1, "tokens": 8}


def test_prune_command_records_trees_trains_and_resumes_without_searching_again(tmp_path, tiny_chat_model):
    """On a tiny random model with SmolLM2's tokenizer: what the command records, trains and
    reuses, not what the model knows (docs/teachers.md has the measured runs)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    config = f"--config=tests/configs/tiny_teachers.py:pruning,{tiny_chat_model}"
    args = [sys.executable, "-m", "jaxdistill", "prune", config,
            f"--config.workdir={tmp_path}", "--config.data.eval_size=3", "--config.pruning.problems=3",
            "--config.pruning.train_problems=2", "--config.search.max_new_tokens=16", "--config.search.gap=3",
            "--config.search.max_levels=1", "--config.search.branch_entropy=0.5", "--config.pruning.seeds=2",
            "--config.pruning.alphas=(0.0,5.0)", "--config.pruning.thresholds=(0.0,0.7)",
            "--config.pruning.ppo.total_timesteps=2048", "--config.pruning.ppo.num_envs=8",
            "--config.pruning.ppo.num_steps=8"]
    env = {**__import__("os").environ, "XLA_FLAGS": ""}
    first = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["train_problems"] + result["test_problems"] + sum(map(len, result["never_paused"])) == 3
    assert len(result["learned"]) == 4 and len(result["best_of_n"]["seeds"]) == 2
    full = result["fixed"]["expand everything"]
    # best-of-N spends at least each held-out tree's tokens; the threshold-0 heuristic is the full expansion
    assert all(r["tokens"] >= full["tokens"] for r in result["best_of_n"]["seeds"])
    assert result["heuristic"][0]["tokens"] == full["tokens"] and result["heuristic"][0]["gold"] == full["gold"]
    assert "| PPO, alpha 5, seed 1 |" in (tmp_path / "summary.md").read_text()
    for row in result["matched_best_of_n"]:  # best-of-N at exactly the pruned search's tokens, every seed
        assert row["best_of_n"]["tokens"] == [row["tokens"]] * 2  # the pruned samples may run out before it
        assert all(t <= row["tokens"] for t in row["best_of_n_filtered"]["tokens"])
        assert all(d <= g for d, g in zip(row["best_of_n"]["distinct"], row["best_of_n"]["gold"], strict=True))
        assert row["search"]["distinct"] <= row["search"]["gold"]
        theirs = np.asarray(row["best_of_n_filtered"]["solved_per_problem"])  # per-problem outcomes kept
        assert theirs.shape == (2, result["test_problems"]) and theirs.sum(axis=1).tolist() == row[
            "best_of_n_filtered"]["solved"] and sum(row["search"]["solved_per_problem"]) == row["search"]["solved"]
    assert "Search vs best-of-N from" in (tmp_path / "summary.md").read_text()
    # docs/teachers.md's tables come from results.json alone (scripts/docs_tables.py pruning)
    sys.path.insert(0, str(root / "scripts"))
    import docs_tables

    record = f"record={tmp_path / 'results.json'}"
    held_out = docs_tables.generate(f"pruning part=held-out {record}")
    ppo = [r["gold"] for r in result["learned"] if r["alpha"] == 5.0]
    assert f"| PPO pruner, price 5 (2 seeds) | {np.mean(ppo):,.1f} ± {np.std(ppo, ddof=1):.1f} |" in held_out
    tuned = result["tuned_heuristic"][1]
    assert (f"| confidence pruner at {tuned['threshold']:.2f} (chosen on the training trees at price 5) | "
            f"{tuned['gold']:,.1f} | {tuned['tokens']:,.0f} |") in held_out
    for part in ("return", "matched"):
        assert docs_tables.generate(f"pruning part={part} {record}") in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "pruning.png").stat().st_size > 10_000
    board = read_board(tmp_path)  # PPO curves per (price, seed), the summary and the plot
    updates = 2048 // (8 * 8)
    assert board["scalars"]["episode_return/alpha_5/seed_1"].keys() == set(range(1, updates + 1))
    assert board["scalars"]["episode_return/alpha_5/seed_1"][updates] == pytest.approx(
        result["history"]["episode_return"][1][1][-1])
    assert set(board["images"]) == {"pruning"} and "PPO, alpha 5" in board["text"]["summary/text_summary"]
    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trees").iterdir()}
    assert len(saved) == 3 + 2  # three trees, best-of-N for two seeds
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trees").iterdir()} == saved
    assert "recording complete search trees" not in again.stderr
