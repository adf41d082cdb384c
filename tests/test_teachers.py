"""The teacher stack: aggregation rules, cross-vocabulary alignment, lockstep decoding, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import read_board, tiny_model

from jaxdistill import mesh as mesh_lib
from jaxdistill import sampling
from jaxdistill.data.synthetic import synthetic_records
from jaxdistill.errors import ConfigError
from jaxdistill.teachers import aggregate as agg
from jaxdistill.teachers import align as align_lib
from jaxdistill.teachers import lockstep
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block, validate_teachers


def _logp(*rows):
    return jnp.log(jnp.asarray(rows, jnp.float32))[:, None, :]  # [N, B=1, V]


def test_aggregation_rules_on_hand_computed_distributions():
    logp = _logp([0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.4, 0.4])
    w = jnp.asarray([[3.0, 1.0]])
    np.testing.assert_allclose(jnp.exp(agg.MeanProbs()(logp, w))[0], [0.55, 0.175, 0.175, 0.1], atol=1e-6)
    poe = np.asarray(jnp.exp(agg.MeanLogProbs()(logp, w))[0])
    expected = np.array([0.7**0.75 * 0.1**0.25, 0.2**0.75 * 0.1**0.25, 0.1**0.75 * 0.4**0.25, 0.0])
    np.testing.assert_allclose(poe, expected / expected.sum(), atol=1e-6)  # the first teacher vetoes token 3
    # a teacher with zero weight vetoes nothing, and the mixture of one teacher is that teacher
    for rule in (agg.MeanProbs(), agg.MeanLogProbs()):
        np.testing.assert_allclose(jnp.exp(rule(logp, jnp.asarray([[0.0, 1.0]])))[0], [0.1, 0.1, 0.4, 0.4], atol=1e-6)
    gated = agg.Gated(threshold=0.6)
    np.testing.assert_allclose(jnp.exp(gated(logp, w))[0], [0.7, 0.2, 0.1, 0.0], atol=1e-6)  # lead is confident
    np.testing.assert_allclose(jnp.exp(agg.Gated(threshold=0.8)(logp, w))[0], [0.55, 0.175, 0.175, 0.1], atol=1e-6)


def test_diversity_statistics_match_their_definitions():
    """Jensen-Shannon divergence per pair, top-1 agreement and the mixture's entropy gain, summed over
    the live rows only, against numpy on hand-written distributions (zeros included)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(6, 0.5), size=(3, 4))  # [N=3, B=4, V=6]
    p[0, 0, :2] = 0.0
    p /= p.sum(-1, keepdims=True)
    live = np.array([True, True, False, True])
    js, agree, gain = lockstep.pairwise_stats(jnp.log(jnp.asarray(p, jnp.float32)), jnp.asarray(live))

    def h(q):
        return -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)

    def kl(a, b):
        return np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / b), 0.0), axis=-1)

    for i in range(3):
        for j in range(3):
            m = 0.5 * (p[i] + p[j])
            expected = np.sum((0.5 * kl(p[i], m) + 0.5 * kl(p[j], m)) * live)
            np.testing.assert_allclose(js[i, j], expected, atol=1e-5)
            assert agree[i, j] == np.sum((p[i].argmax(-1) == p[j].argmax(-1)) & live)
    np.testing.assert_allclose(gain, np.sum((h(p.mean(0)) - h(p).mean(0)) * live), atol=1e-5)


def test_perplexity_and_online_weights():
    w = agg.perplexity_weights(np.log([[2.0, 4.0, 4.0]]))  # perplexities 2, 4, 4 -> weights 1/2 : 1/4 : 1/4
    np.testing.assert_allclose(w, [[0.5, 0.25, 0.25]], atol=1e-6)
    online = agg.OnlineWeights(3, temperature=1.0)
    np.testing.assert_allclose(online(), [1 / 3] * 3, atol=1e-6)
    online.update([[1, 0, 0], [1, 1, 0]])
    np.testing.assert_allclose(online.accuracy, [3 / 4, 2 / 4, 1 / 4])
    assert online()[0] > online()[1] > online()[2]


@pytest.mark.parametrize("teachers, message", [
    ([], "stack is empty"),
    ([TeacherConfig("a", "m"), TeacherConfig("a", "m")], "names must be unique"),
    ([TeacherConfig("a", "m", style="poem")], "style 'poem'"),
    ([TeacherConfig("a", "m", weight=-1.0)], "weight must be"),
    ([TeacherConfig("a", "m", weight=0.0)], "at least one teacher needs a weight"),
])
def test_bad_stacks_are_refused_before_loading(teachers, message):
    with pytest.raises(ConfigError, match=message):
        validate_teachers(teachers)


def test_every_pivot_token_maps_to_gemma_tokens_with_exactly_its_bytes(tiny_smollm2, tiny_gemma3):
    smollm2, gemma3 = tiny_smollm2, tiny_gemma3
    pivot, gemma = smollm2[1], gemma3[1]
    a = align_lib.align(pivot, gemma, width=8)
    pivot_bytes, gemma_bytes = align_lib.token_bytes(pivot), align_lib.token_bytes(gemma)
    text_tokens = [c for c, b in enumerate(pivot_bytes) if b is not None]
    assert a.excluded == 0 and (a.lengths[text_tokens] > 0).all()
    for c in text_tokens:
        assert b"".join(gemma_bytes[t] for t in a.pieces[c, : a.lengths[c]]) == pivot_bytes[c]
    assert (a.lengths[text_tokens] == 1).mean() > 0.9  # most pieces are exact matches
    narrow = align_lib.align(pivot, gemma, width=2)  # what does not fit is counted, never cut
    assert narrow.excluded == int((a.lengths > 2).sum()) and narrow.excluded > 0
    # scoring: each Gemma token proposes the pivot token with its text, else the longest one it starts with
    exact = {b: c for c, b in enumerate(pivot_bytes) if b is not None}
    proposed = 0
    for t, b in enumerate(gemma_bytes):
        c = int(a.to_pivot[t])
        if b is None or c < 0:
            continue
        proposed += 1
        assert b.startswith(pivot_bytes[c])
        assert c == exact.get(b, c)
    assert proposed > 0.95 * sum(b is not None for b in gemma_bytes)


def _stack(smollm2, gemma3, teachers, **kw):
    loaded = {"smollm2": smollm2, "gemma3": gemma3}
    return TeacherStack(teachers, loaded=loaded, fewshot=fewshot_block(synthetic_records(2, 0)), **kw)


def test_smollm2_and_gemma3_decode_one_text_and_each_stream_is_exactly_that_text(tiny_smollm2, tiny_gemma3):
    smollm2, gemma3 = tiny_smollm2, tiny_gemma3
    stack = _stack(smollm2, gemma3, [TeacherConfig("smol", "smollm2"), TeacherConfig("gemma", "gemma3",
                                                                                      style="fewshot")])
    records = synthetic_records(3, 1, split="test")
    out = stack.run(records, rule=sampling.Sample(temperature=1.0), max_new_tokens=40, seed=3, diversity=True)
    assert out.mask.sum() > 30
    tables = {name: align_lib.token_bytes(stack.models[name][1]) for name in ("smollm2", "gemma3")}

    def text_bytes(name, ids):  # exact bytes (random weights sample stray UTF-8 pieces, which decode lossily)
        return b"".join(tables[name][t] or b"" for t in ids)

    for r in range(len(records)):
        committed = out.tokens[r][out.mask[r]].tolist()
        assert stack.pivot.decode(committed) == out.texts[r]
        for i, name in enumerate(("smollm2", "gemma3")):
            assert text_bytes(name, stack.stream(i, committed)) == text_bytes("smollm2", committed)
    assert np.isfinite(out.teacher_logprob[:, out.mask]).all()
    np.testing.assert_allclose(np.diag(out.stats["agree"]), out.stats["positions"])


def test_a_stack_of_one_teacher_decodes_like_the_teacher_alone(tiny_smollm2, tiny_gemma3):
    smollm2, gemma3 = tiny_smollm2, tiny_gemma3
    stack = _stack(smollm2, gemma3, [TeacherConfig("smol", "smollm2")])
    records = synthetic_records(2, 2, split="test")
    out = stack.run(records, max_new_tokens=24, top_k=0)
    model, tokenizer = smollm2
    alone = sampling.generate(model, [stack.prompt(0, r) for r in records], max_new_tokens=24,
                              eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    for r in range(len(records)):
        n = out.mask[r].sum()
        np.testing.assert_array_equal(out.tokens[r, :n], alone.tokens[r, :n])
        # the only difference: special tokens that are never candidates lose their (tiny) mass
        np.testing.assert_allclose(out.logprob[r, :n], alone.logprobs[r, :n], atol=1e-3)
        np.testing.assert_allclose(out.teacher_logprob[0, r, :n], out.logprob[r, :n], atol=1e-6)


def test_recorded_top_k_is_the_aggregated_distribution_at_every_forced_position(tiny_smollm2, tiny_gemma3):
    """A one-teacher stack scoring a given text keeps, at each position, that teacher's top
    tokens with their log-probs renormalised over its top-k candidates (the sparse target)."""
    smollm2, gemma3 = tiny_smollm2, tiny_gemma3
    stack = _stack(smollm2, gemma3, [TeacherConfig("smol", "smollm2")])
    model, tokenizer = smollm2
    record = synthetic_records(1, 4, split="test")[0]
    text = tokenizer.encode(record.solution, add_special_tokens=False)
    out = stack.run([record], forced=[text], top_k=10, record_top=5)
    prompt = stack.prompt(0, record)
    logits = model(jnp.asarray([prompt + text]))[0, len(prompt) - 1 : len(prompt) - 1 + len(text)]
    logp = np.asarray(jax.nn.log_softmax(logits))
    allowed = np.asarray(stack.allowed)  # pivot tokens that can be committed: text and the end tokens
    for position in range(len(text)):
        ranked = [int(i) for i in np.argsort(-logp[position]) if allowed[i]][:10]
        renormalised = logp[position, ranked] - np.logaddexp.reduce(logp[position, ranked])
        assert out.top_ids[0, position].tolist() == ranked[:5]
        np.testing.assert_allclose(out.top_logprobs[0, position], renormalised[:5], atol=2e-4)
    assert out.tokens[0, : len(text)].tolist() == text


def test_scoring_in_one_forward_equals_forced_decoding_step_by_step(tiny_smollm2, tiny_gemma3):
    """`score` (one forward per group) gives what the lockstep loop fed the same tokens gives: the
    aggregated and per-teacher log-probs, the recorded top-k and the diversity sums, across two
    vocabularies and for completions of different lengths."""
    smollm2, gemma3 = tiny_smollm2, tiny_gemma3
    stack = _stack(smollm2, gemma3, [TeacherConfig("smol", "smollm2"), TeacherConfig("smol-fewshot", "smollm2",
                                                                                      style="fewshot"),
                                     TeacherConfig("gemma", "gemma3", style="fewshot", weight=2.0)])
    records = synthetic_records(3, 2, split="test")
    sampled = stack.run(records, rule=sampling.Sample(temperature=1.0), max_new_tokens=20, seed=5)
    texts = [row[m].tolist() for row, m in zip(sampled.tokens, sampled.mask, strict=True)]
    shortest = min(len(t) for t in texts)
    assert shortest >= 13
    completions = [t[: shortest - 6 * r] for r, t in enumerate(texts)]  # three lengths
    for rule in (agg.MeanProbs(), agg.MeanLogProbs()):
        step = stack.run(records, aggregate=rule, forced=completions, top_k=10, record_top=5, diversity=True)
        fast = stack.score(records, completions, aggregate=rule, top_k=10, record_top=5, diversity=True)
        np.testing.assert_array_equal(fast.mask, step.mask)
        np.testing.assert_allclose(fast.logprob[fast.mask], step.logprob[step.mask], atol=2e-4)
        np.testing.assert_allclose(fast.teacher_logprob[:, fast.mask], step.teacher_logprob[:, step.mask], atol=2e-4)
        np.testing.assert_array_equal(fast.top_ids[fast.mask], step.top_ids[step.mask])
        np.testing.assert_allclose(fast.top_logprobs[fast.mask], step.top_logprobs[step.mask], atol=2e-4)
        for name in ("js", "agree", "entropy_gain", "differs", "positions"):
            np.testing.assert_allclose(fast.stats[name], step.stats[name], rtol=1e-3, atol=1e-3)


def test_a_fewshot_reply_end_counts_as_the_end_of_turn_when_asked(smollm2, tiny_smollm2, tiny_gemma3):
    """With `fewshot_ends_turn`, a few-shot teacher's probability of the end-of-turn token is its
    probability of ending the way its format does: a blank line anywhere, any line break once the
    '#### <answer>' line is written; chat teachers are unchanged. Against the model's own full
    distribution, and in decode and `score` alike (Gemma through the cross-vocabulary map; the
    trained model for its probabilities, small random ones for the loop's equality)."""
    gemma3 = tiny_gemma3
    teachers = [TeacherConfig("smol", "smollm2"), TeacherConfig("smol-fewshot", "smollm2", style="fewshot")]
    records = synthetic_records(2, 2, split="test")
    model, tokenizer = smollm2
    end = tokenizer.turn_end_id
    completions = [tokenizer.encode(r.solution) + [end] for r in records]  # ends right after "#### N"
    plain = _stack(smollm2, gemma3, teachers).score(records, completions, top_k=0)
    stack = _stack(smollm2, gemma3, teachers, fewshot_ends_turn=True)
    ended = stack.score(records, completions, top_k=0)
    np.testing.assert_allclose(ended.teacher_logprob[0], plain.teacher_logprob[0], atol=1e-4)
    blank, line_break = np.asarray(stack.stops.blank_line), np.asarray(stack.stops.line_break)
    allowed = np.asarray(stack.allowed)
    for r, (record, completion) in enumerate(zip(records, completions, strict=True)):
        prompt = stack.prompt(1, record)
        logits = model(jnp.asarray([prompt + completion[:-1]]))[0, len(prompt) - 1:]
        p = np.exp(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64))
        marker_at = next(t for t, c in enumerate(completion) if stack.stops.marker[c])
        for t in (0, len(completion) - 1):  # before the answer line: blank lines end; after it: any line break
            ends = blank | (line_break if t > marker_at else False)
            moved = p[t].copy()
            moved[end] += moved[ends].sum()
            moved[ends] = 1e-10
            expected = np.log(moved[completion[t]] / moved[allowed].sum())
            np.testing.assert_allclose(ended.teacher_logprob[1, r, t], expected, atol=2e-4)
        last = len(completion) - 1
        assert np.exp(ended.teacher_logprob[1, r, last]) > 0.9 > 0.1 > np.exp(plain.teacher_logprob[1, r, last])
    # the decode loop applies the same rule as `score`, across two vocabularies
    mixed = _stack(tiny_smollm2, gemma3, [*teachers, TeacherConfig("gemma", "gemma3", style="fewshot")],
                   fewshot_ends_turn=True)
    step = mixed.run(records, forced=completions, top_k=10)
    fast = mixed.score(records, completions, top_k=10)
    np.testing.assert_allclose(fast.teacher_logprob[:, fast.mask], step.teacher_logprob[:, step.mask], atol=2e-4)
    np.testing.assert_allclose(fast.logprob[fast.mask], step.logprob[step.mask], atol=2e-4)


def test_teacher_axis_sharded_over_8_devices_equals_one_device(tiny_smollm2):
    smollm2 = tiny_smollm2
    tokenizer = smollm2[1]
    loaded = {f"t{i}": (tiny_model(seed=i, vocab_size=tokenizer.vocab_size), tokenizer) for i in range(8)}
    teachers = [TeacherConfig(f"t{i}", f"t{i}", weight=1.0 + i) for i in range(8)]
    records = synthetic_records(2, 3, split="test")
    mesh = mesh_lib.make_mesh({"teacher": 8})
    one = TeacherStack(teachers, loaded=loaded)
    sharded = TeacherStack(teachers, loaded=loaded, mesh=mesh)
    assert len(sharded.groups) == 1 and sharded.groups[0].state["embed"].get_value().sharding.spec[0] == "teacher"
    for rule in (agg.MeanProbs(), agg.MeanLogProbs()):
        a = one.run(records, aggregate=rule, rule=sampling.Sample(), max_new_tokens=12, seed=1, diversity=True)
        b = sharded.run(records, aggregate=rule, rule=sampling.Sample(), max_new_tokens=12, seed=1, diversity=True)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-5)
        np.testing.assert_allclose(a.teacher_logprob, b.teacher_logprob, atol=1e-5)
        np.testing.assert_allclose(a.stats["js"], b.stats["js"], atol=1e-4)
    assert jax.device_count() == 8


def test_teachers_command_runs_every_arm_and_resumes_without_redoing_them(tmp_path, tiny_chat_model,
                                                                          tiny_gemma_model):
    """On tiny random models with SmolLM2's and Gemma 3's tokenizers: what the command writes and
    what a rerun redoes, not what the models know (docs/teachers.md has the measured runs)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    config = f"--config=tests/configs/tiny_teachers.py:default,{tiny_chat_model},{tiny_gemma_model}"
    args = [sys.executable, "-m", "jaxdistill", "teachers", config,
            f"--config.workdir={tmp_path}", "--config.data.eval_size=2", "--config.batch_size=2",
            "--config.max_new_tokens=12", "--config.rules=('mean_probs','perplexity','online')",
            "--config.search.problems=1", "--config.search.max_new_tokens=16", "--config.search.token_budget=64",
            "--config.search.max_levels=1", "--config.search.branch_entropy=0.5", "--config.seeds=2",
            "--config.online_problems=2"]
    env = {**__import__("os").environ, "XLA_FLAGS": ""}
    first = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["arms"]) == ["alone: smollm2-chat", "alone: smollm2-fewshot", "alone: gemma3-fewshot",
                                     "stack: mean_probs", "stack: perplexity", "stack: online"]
    singles = np.asarray([results["arms"][f"alone: {name}"]["correct"] for name in results["teachers"]], bool)
    assert results["oracle"]["correct"] == singles.any(axis=0).tolist()  # [seeds, problems]
    assert "| oracle: any single teacher right" in (tmp_path / "summary.md").read_text()
    js = np.asarray(results["diversity"]["js"])
    assert (np.diag(js) < 1e-5).all() and (js[~np.eye(3, dtype=bool)] > 0).all() and np.allclose(js, js.T)
    assert (tmp_path / "diversity.png").stat().st_size > 10_000 and "| stack: online |" in (
        tmp_path / "summary.md").read_text()
    search = results["search"]
    assert search["search"]["leaves"] >= 2 and search["search"]["tokens"] > 16  # it branched
    assert len(search["best_of_n"]) == 2 and all(r["tokens"] >= search["search"]["tokens"] for r in search["best_of_n"])
    gold = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert len(gold) == search["search"]["gold"]
    for trace in gold:  # the stack's top-20 distribution at each token of the trace
        assert len(trace["top_ids"]) == len(trace["pivot_tokens"]) and len(trace["top_ids"][0]) == 20
    assert (tmp_path / "search_tree.png").stat().st_size > 5_000
    board = read_board(tmp_path)
    assert board["scalars"]["stack__online/accuracy"][0] == pytest.approx(np.mean(
        results["arms"]["stack: online"]["accuracy"]))
    assert set(board["images"]) == {"diversity", "search_tree"} and "| stack: online |" in board["text"][
        "summary/text_summary"]
    saved = {p.name: p.stat().st_mtime_ns for d in ("arms", "search") for p in (tmp_path / d).iterdir()}
    # arms, each teacher on the fitting problems, diversity; one search, its gold traces' top-20, best-of-N x 2
    assert len(saved) == 6 + 3 + 1 + 1 + (search["search"]["gold"] > 0) + 2
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher stack:" in first.stdout and "teacher stack:" not in again.stdout  # everything saved: no model
    assert {p.name: p.stat().st_mtime_ns for d in ("arms", "search") for p in (tmp_path / d).iterdir()} == saved
    assert json.loads((tmp_path / "results.json").read_text())["arms"] == results["arms"]


def test_gold_traces_are_read_by_the_self_distillation_loader_and_negatives_pair_with_them(tmp_path):
    import json

    from jaxdistill.data import read_jsonl
    from jaxdistill.teachers.traces import write_traces

    record = synthetic_records(1, 0, split="test")[0]
    good, bad = f"So the answer is\n#### {record.answer}\n", "So the answer is\n#### 999\n"
    leaves = [{"branch": 1, "text": good, "tokens": [1, 2, 3], "correct": True, "confidence": 0.9, "path": ["right"]},
              {"branch": 2, "text": bad, "tokens": [1, 2, 4], "correct": False, "confidence": 0.5, "path": ["wrong"],
               "wrong_at": 2, "wrong_token": "4", "gold_token": "3", "gold_branch": 1}]
    write_traces([record], [{"leaves": leaves}], None, tmp_path)
    (loaded,) = read_jsonl(tmp_path / "traces.jsonl")
    assert (loaded.problem, loaded.solution, loaded.answer) == (record.problem, good, record.answer)
    (negative,) = [json.loads(line) for line in (tmp_path / "negatives.jsonl").read_text().splitlines()]
    assert (negative["chosen"], negative["rejected"], negative["wrong_at_token"]) == (good, bad, 2)


@pytest.mark.parametrize("override, message", [
    ("--config.search.wrong=-1", "wrong >= 0"),
    ("--config.search.token_budget=10", "smaller than one rollout"),
    ("--config.pivot=llama-70b", "pivot 'llama-70b' is not a teacher's model"),
    ("--config.rules=('mean_probs','majority')", "unknown aggregation rules ['majority']"),
    ("--config.top_k=-1", "top_k must be >= 0"),
])
def test_bad_settings_are_refused_before_any_model_loads(capsys, tmp_path, monkeypatch, override, message):
    from jaxdistill.main import main
    from jaxdistill.teachers import stack as stack_lib

    monkeypatch.setattr(stack_lib, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["jaxdistill", "teachers", "--config=experiments/teachers/default.py",
                 f"--config.workdir={tmp_path}", override])
    assert code == 2 and message in capsys.readouterr().err


def test_a_teacher_that_cannot_load_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher 'broken' cannot load '.*missing.gguf'"):
        TeacherStack([TeacherConfig("broken", str(tmp_path / "missing.gguf"))])


def test_the_qa_task_gives_exact_answers_that_replies_are_matched_against():
    import ml_collections

    from jaxdistill.data.records import answer_matches
    from jaxdistill.teachers import run as run_lib

    config = ml_collections.ConfigDict({"data": dict(task="qa", seed=0, eval_size=8, fewshot_examples=4),
                                        "online_problems": 6})
    test, fit, search, fewshot = run_lib.problems(config, search=5)
    assert [r.answer for r in test[:4]] == ["54", "no", "Cairo", "positive"]  # one question per family
    assert all(answer_matches(r.solution, r.answer) for r in test)
    assert fewshot.count("\n#### ") == 4 and not any(r.problem in fewshot for r in test)
    assert len(fit) == 6 and len(search) == 5 and not {r.problem for r in fit + search} & {r.problem for r in test}
    assert answer_matches("Noah lives there.\n#### cairo.", "Cairo") and not answer_matches("#### Lima", "Cairo")
    assert not answer_matches("#### Cairo", None)  # no exact answer: never verified


def test_teachers_search_and_fit_on_training_problems_and_refuse_held_out_ones(monkeypatch):
    """Math problems repeat across splits by chance (3 in 400 at the default sizes): the training
    split skips the held-out ones, and a search set that still overlaps is refused."""
    import ml_collections

    from jaxdistill.data.synthetic import SyntheticConfig, synthetic_records
    from jaxdistill.teachers import run as run_lib

    config = ml_collections.ConfigDict({"data": dict(task="math", seed=0, eval_size=256, fewshot_examples=2, steps=1,
                                                     max_start=20, max_operand=12), "online_problems": 16})
    test, fit, search, _ = run_lib.problems(config, search=400)
    assert len(search) == 400 and not {r.problem for r in fit + search} & {r.problem for r in test}
    small = SyntheticConfig(steps=1, max_start=20, max_operand=12)
    unfiltered = synthetic_records(400, 0, small, "train", held_out=0)
    assert {r.problem for r in unfiltered} & {r.problem for r in test}  # what the filter removes exists
    monkeypatch.setattr(run_lib, "synthetic_records", lambda n, seed, cfg, split, **kw: synthetic_records(
        n, seed, cfg, "test"))  # as if the training split were the held-out one
    with pytest.raises(ConfigError, match="search problems are also held-out problems"):
        run_lib.problems(config, search=3)


def test_online_weights_and_the_best_of_n_teacher_never_read_held_out_answers(tmp_path, monkeypatch):
    """The same run with every held-out answer and solution replaced by garbage: the online rule's
    answers, its weights and the chosen teacher stay the same; only the held-out scores move."""
    import dataclasses
    import importlib.util
    import json
    from pathlib import Path

    from jaxdistill.teachers import run as run_lib

    spec = importlib.util.spec_from_file_location("teachers_default",
                                                  Path(__file__).parent.parent / "experiments/teachers/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.teachers = config.teachers[:2]  # SmolLM2 in chat and few-shot styles: one model, loaded once
    config.rules, config.online_problems, config.max_new_tokens, config.batch_size = ("online",), 3, 8, 4
    config.data.eval_size, config.search.problems = 3, 0
    real = run_lib.problems

    def garbage(config, search=0):
        p = real(config, search)
        return p._replace(test=[dataclasses.replace(r, answer="-12345", solution="x\n#### -12345") for r in p.test])

    runs = []
    for name, problems in (("real", real), ("garbage", garbage)):
        monkeypatch.setattr(run_lib, "problems", problems)
        (tmp_path / name).mkdir()
        runs.append(run_lib._run(config, tmp_path / name))
        monkeypatch.undo()
    online = [json.loads((tmp_path / name / "arms" / "stack-online-seed0.json").read_text()) for name in ("real",
                                                                                                      "garbage")]
    assert online[0]["texts"] == online[1]["texts"]
    assert runs[0]["train_accuracy"] == runs[1]["train_accuracy"] and runs[0]["best_single"] == runs[1]["best_single"]
    assert runs[1]["arms"]["stack: online"]["accuracy"] == [0.0]  # no reply says -12345
