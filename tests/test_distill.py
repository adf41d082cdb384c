import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import read_board, tiny_model
from ml_collections import config_dict

from jaxdistill import mesh as mesh_lib
from jaxdistill.data import DataError, extract_answer, load_records, read_jsonl, synthetic_records, tfds_records
from jaxdistill.distill import rollouts
from jaxdistill.distill import step as step_lib
from jaxdistill.distill import train as train_lib
from jaxdistill.distill.losses import LossConfig, TargetConfig
from jaxdistill.distill.targets import blend_logits
from jaxdistill.errors import RunError
from jaxdistill.prompts import PromptConfig, prompt_pair, student_messages, teacher_messages

STUDENT = [[5, 6, 7], [8, 9]]
TEACHER = [[5, 6, 7, 10, 11, 12, 13], [8, 9, 14, 15, 16]]
COMPLETIONS = [[20, 21, 22, 2], [23, 24]]


def batch():
    return step_lib.build_batch(STUDENT, TEACHER, COMPLETIONS, pad_id=0, multiple=8)


def test_batch_aligns_generated_tokens_in_both_contexts():
    b = batch()
    width = b["tokens"].shape[1] - b["target_mask"].shape[1]
    for i, completion in enumerate(COMPLETIONS):
        for row in (2 * i, 2 * i + 1):  # student row, teacher row
            assert b["tokens"][row, width : width + len(completion)].tolist() == completion
        assert b["target_mask"][i].sum() == len(completion)
    assert b["tokens"][1, width - 7 : width].tolist() == TEACHER[0]
    assert b["mask"].sum(1).tolist() == [7, 11, 4, 7]


def test_one_combined_forward_equals_two_separate_forwards():
    model, b = tiny_model(), batch()
    together = model.hidden_states(jnp.asarray(b["tokens"]), None, jnp.asarray(b["mask"]))[0]
    for rows in (slice(0, None, 2), slice(1, None, 2)):  # student rows, teacher rows
        alone = model.hidden_states(jnp.asarray(b["tokens"][rows]), None, jnp.asarray(b["mask"][rows]))[0]
        valid = b["mask"][rows, :, None]
        np.testing.assert_allclose(np.where(valid, together[rows], 0), np.where(valid, alone, 0), atol=1e-5)


def _loss_and_grads(model, b, combined=True):
    from flax import nnx

    graphdef, params = nnx.split(model)
    fn = lambda p: step_lib.distill_loss(graphdef, p, None, b, TargetConfig(),  # noqa: E731
                                         LossConfig(chunk=4), combined)[0]
    return jax.value_and_grad(fn)(params)


def test_combined_forward_and_separate_teacher_forward_give_the_same_loss_and_gradients():
    model, b = tiny_model(), batch()
    value, grads = _loss_and_grads(model, b, combined=True)
    value2, grads2 = _loss_and_grads(model, b, combined=False)
    # The loss is a small KL (~1e-3), so float32 rounding of differently batched rows shows at ~1e-4.
    assert float(value2) == pytest.approx(float(value), rel=1e-3)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        scale = float(np.abs(np.asarray(g1)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=0, atol=2e-3 * scale)


def test_prompt_padding_and_tail_padding_change_neither_loss_nor_gradients():
    model, b = tiny_model(), batch()
    value, grads = _loss_and_grads(model, b)
    scrambled = {k: v.copy() for k, v in b.items()}
    rng = np.random.default_rng(0)
    noise = rng.integers(1, 60, size=b["tokens"].shape)
    scrambled["tokens"] = np.where(b["mask"], b["tokens"], noise)  # every padded slot gets a random token
    value2, grads2 = _loss_and_grads(model, scrambled)
    assert float(value2) == pytest.approx(float(value), rel=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-7)
    # but a prompt token does matter (the test can fail)
    changed = {k: v.copy() for k, v in b.items()}
    changed["tokens"][1, np.argmax(b["mask"][1])] += 1  # the first teacher prompt
    assert float(_loss_and_grads(model, changed)[0]) != pytest.approx(float(value), rel=1e-6)


def _one_step(model, b, mesh=None, sft_weight=0.0):
    tx = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4))
    graphdef, state = step_lib.init_state(model, tx)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, sft_weight=sft_weight), state, mesh,
                                   sft_rows="sft" in b)
    if mesh is not None:
        b = mesh_lib.host_to_global(b, mesh)
    state, metrics = step(state, b, jax.random.key(0))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_sharded_train_step_on_8_devices_equals_single_device():
    b = step_lib.build_batch(STUDENT * 2, TEACHER * 2, COMPLETIONS * 2, pad_id=0, multiple=8)  # 4 problems
    params1, metrics1 = _one_step(tiny_model(), b)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params8, metrics8 = _one_step(mesh_lib.shard_model(tiny_model(), mesh), b, mesh)
    assert metrics8["loss"] == pytest.approx(metrics1["loss"], rel=1e-4)
    for a, c in zip(jax.tree.leaves(params1), jax.tree.leaves(params8), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5)


def test_sharded_step_with_sft_rows_equals_single_device():
    b = step_lib.build_batch(STUDENT * 2, TEACHER * 2, COMPLETIONS * 2, pad_id=0, multiple=8)
    b["sft"] = step_lib.build_batch(STUDENT * 2, None, [[30, 31, 2], [32, 33, 34, 2]] * 2, pad_id=0, multiple=8)
    params1, metrics1 = _one_step(tiny_model(), b, sft_weight=0.5)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params8, metrics8 = _one_step(mesh_lib.shard_model(tiny_model(), mesh), b, mesh, sft_weight=0.5)
    assert metrics8["sft_loss"] == pytest.approx(metrics1["sft_loss"], rel=1e-4)
    assert metrics8["loss"] == pytest.approx(metrics1["loss"], rel=1e-4)
    for a, c in zip(jax.tree.leaves(params1), jax.tree.leaves(params8), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5)


def test_sft_weight_adds_that_multiple_of_the_reference_cross_entropy_to_loss_and_gradient():
    import optax
    from flax import nnx

    model, b = tiny_model(), batch()
    references = [[30, 31, 2], [32, 33, 34, 2]]
    b["sft"] = step_lib.build_batch(STUDENT, None, references, pad_id=0, multiple=8)
    graphdef, params = nnx.split(model)
    distill = lambda p: step_lib.distill_loss(graphdef, p, None, b, TargetConfig(),  # noqa: E731
                                              LossConfig(chunk=4))[0]
    sft = lambda p: step_lib.sft_loss(graphdef, p, None, b["sft"])[0]  # noqa: E731
    (d, gd), (s, gs) = jax.value_and_grad(distill)(params), jax.value_and_grad(sft)(params)
    tx = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4))
    graphdef, state = step_lib.init_state(model, tx)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, sft_weight=0.5), state)
    _, metrics = step(state, b, jax.random.key(0))
    assert float(metrics["sft_loss"]) == pytest.approx(float(s), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(d) + 0.5 * float(s), rel=1e-5)
    expected_norm = optax.tree.norm(jax.tree.map(lambda x, y: x + 0.5 * y, gd, gs))
    assert float(metrics["grad_norm"]) == pytest.approx(float(expected_norm), rel=1e-4)
    assert float(s) > 10 * float(d)  # the references are far from a random model: the mix is not a no-op


def test_training_on_smollm2_lowers_the_loss_on_a_fixed_batch_and_moves_the_weights(smollm2):
    from flax import nnx

    model, tok = smollm2
    records = synthetic_records(2, seed=3)
    pairs = [prompt_pair(tok, r) for r in records]
    completions = [tok.encode("Let me think. " + r.solution, add_special_tokens=False) for r in records]
    b = step_lib.build_batch([p[0] for p in pairs], [p[1] for p in pairs], completions, pad_id=tok.pad_id)
    tx = step_lib.make_optimizer(step_lib.OptimConfig(lr=3e-5, warmup_steps=1, total_steps=6))
    graphdef, params = nnx.split(model)
    own_copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # the step donates (deletes) its input arrays
    graphdef, state = step_lib.init_state(own_copy, tx)
    before = np.asarray(state.params["layers"]["w_up"][...]).copy()
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx), state)
    losses = []
    for _ in range(5):
        state, metrics = step(state, b, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[1], losses  # step 0 has learning rate 0 (warm-up)
    assert np.abs(np.asarray(state.params["layers"]["w_up"][...]) - before).max() > 0


def test_student_and_teacher_prompts_differ_only_by_the_hint(smollm2):
    _, tok = smollm2
    record = synthetic_records(1, seed=0)[0]
    student, teacher = student_messages(record), teacher_messages(record)
    assert len(student) == len(teacher) == 1
    hint_start = teacher[0]["content"].index("Here is a reference solution")
    hint_end = teacher[0]["content"].index(record.solution) + len(record.solution)
    assert teacher[0]["content"][:hint_start] + teacher[0]["content"][hint_end + 2 :] == student[0]["content"]
    s_text = tok.chat_text(student)
    t_text = tok.chat_text(teacher)
    assert s_text.split(record.problem)[0] == t_text.split(record.problem)[0]  # same template prefix
    assert s_text.endswith("<|im_start|>assistant\n") and t_text.endswith("<|im_start|>assistant\n")


def test_guided_rule_gives_both_rows_the_token_sampled_from_the_blend():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 30)) * 2)  # rows 0, 2 students; 1, 3 their teachers
    rule = rollouts.GuidedRule(0.75, 1.0)
    keys = jax.random.split(jax.random.key(1), 4)
    tokens = rule(logits, keys, 0)
    assert tokens[0::2].tolist() == tokens[1::2].tolist()
    expected = jax.vmap(jax.random.categorical)(keys[0::2], blend_logits(logits[1::2], logits[0::2]))
    assert tokens[0::2].tolist() == expected.tolist()


def test_answers_are_extracted_like_gsm8k():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,234.50") == "1234.5"
    assert extract_answer("I think it is 12 or maybe 15") == "15"
    assert extract_answer("no numbers") is None


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_forms_are_read(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}),
        json.dumps({"prompt": "Name a colour.", "solution": "Blue."}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Draft"},
                                 {"role": "user", "content": "Shorter"}, {"role": "assistant", "content": "Ok."}]}),
    ])
    gsm, generic, chat = read_jsonl(path)
    assert (gsm.answer, generic.answer, chat.answer) == ("5", None, None)
    assert chat.problem == "Shorter" and chat.solution == "Ok."
    assert chat.history == (("user", "Hi"), ("assistant", "Draft"))


@pytest.mark.parametrize("line,message", [
    ('{"question": "2+2?"}', r"record 2 \(line 2\): missing field 'answer'"),
    ('{"question": "2+2?", "answer": "4"}', "no '#### <final answer>' line"),
    ('{"prompt": "x"}', "missing field 'solution'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "accepted assistant reply"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', r"messages\[0\]: missing field"),
    ('{"text": "hello"}', "unknown record form"),
    ('{"question": ', "not valid JSON"),
])
def test_malformed_records_name_file_record_and_field(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"prompt": "ok", "solution": "fine"}), line])
    with pytest.raises(DataError, match=message) as err:
        read_jsonl(path)
    assert str(path) in str(err.value)


def test_tfds_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build gsm8k"):
        tfds_records("gsm8k", "train", str(tmp_path))


def test_synthetic_data_is_seeded_and_splits_are_disjoint():
    config = config_dict.ConfigDict(dict(source="synthetic", seed=4, train_size=50, eval_size=20, steps=1,
                                         max_start=20, max_operand=12))
    train, test = load_records(config)
    again, _ = load_records(config)
    assert train == again
    assert {r.uid for r in train}.isdisjoint({r.uid for r in test})
    for r in train:
        assert r.solution.endswith(f"#### {r.answer}")
        assert extract_answer(r.solution) == r.answer


def tiny_run_config(workdir, steps=4, model="smollm2-135m-instruct"):
    """A few steps of the default job. Tests of the loop's machinery (resume, settings, export) pass
    `tiny_chat_model`: SmolLM2's tokenizer on a 2-layer random model, so the steps cost little."""
    config = config_dict.ConfigDict(json.loads(json.dumps({
        "model": str(model), "dtype": "float32", "compute_dtype": "", "remat": False,
        "workdir": str(workdir), "seed": 0, "arm": "blend", "teacher_weight": 0.75, "fixed_k": 1.75,
        "guided": False, "frozen_teacher": False, "combined_forward": True, "steps": steps, "batch_size": 1,
        "sample": {"max_new_tokens": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        "optim": {"lr": 1e-4, "warmup_steps": min(1, steps - 1), "end_lr_fraction": 0.1, "weight_decay": 0.0, "b1": 0.9,
                  "b2": 0.95, "clip_norm": 1.0, "accumulate": 1},
        "loss": {"kind": "forward_kl", "jsd_beta": 0.5, "top_k": 0, "clip": 0.0, "chunk": 16},
        "data": {"source": "synthetic", "seed": 0, "train_size": 20, "eval_size": 2, "steps": 1, "max_start": 20,
                 "max_operand": 12},
        "eval": {"before": False, "after": False, "every": 0, "max_new_tokens": 8, "batch_size": 2, "mean_at_k": 0},
        "checkpoint": {"every": 2, "keep": 2}, "mesh": {},
    })))
    return config


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch, tiny_chat_model):
    monkeypatch.chdir(tmp_path)  # relative workdirs, as in the default config
    straight = tmp_path / "straight"
    train_lib.run(tiny_run_config("straight", model=tiny_chat_model))
    resumed = tmp_path / "resumed"
    real_build = step_lib.build_batch
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated pre-emption after the step-2 checkpoint")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(step_lib, "build_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train_lib.run(tiny_run_config("resumed", model=tiny_chat_model))
    monkeypatch.setattr(step_lib, "build_batch", real_build)
    train_lib.run(tiny_run_config("resumed", model=tiny_chat_model))
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m1, m2 in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "generated_tokens", "kl_teacher_student"):
            assert m1[key] == m2[key], (m1["step"], key)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_a_rerun_under_other_settings_is_refused_a_harmless_one_continues_and_a_deliberate_one_is_recorded(
        tmp_path, monkeypatch, tiny_chat_model):
    monkeypatch.chdir(tmp_path)
    config_for = functools.partial(tiny_run_config, model=tiny_chat_model)
    train_lib.run(config_for("w", steps=2))
    assert json.loads((tmp_path / "w" / "config.json").read_text())["optim"]["lr"] == 1e-4
    before = _metrics(tmp_path / "w")
    changed = config_for("w", steps=2)
    changed.optim.lr, changed.seed = 2e-4, 1
    with pytest.raises(RunError, match=r"other settings \(optim.lr: 0.0001 -> 0.0002; seed: 0 -> 1\)\. Use a new "
                                       r"--config.workdir, or --config.resume=ignore_config_changes"):
        train_lib.run(changed)
    harmless = config_for("w", steps=2)
    harmless.eval.batch_size, harmless.checkpoint.keep = 1, 3
    train_lib.run(harmless)  # finished: nothing to redo, nothing refused
    assert _metrics(tmp_path / "w") == before
    more = config_for("w", steps=3)
    more.resume = "ignore_config_changes"
    train_lib.run(more)
    assert [m["step"] for m in _metrics(tmp_path / "w")] == [1, 2, 3] and _metrics(tmp_path / "w")[:2] == before
    assert "Continued with changed settings (resume=ignore_config_changes): steps: 2 -> 3" in (
        tmp_path / "w" / "summary.md").read_text()


def test_a_run_with_sft_weight_logs_the_reference_cross_entropy_inside_its_loss(tmp_path, monkeypatch,
                                                                               tiny_chat_model):
    monkeypatch.chdir(tmp_path)
    config = tiny_run_config("mixed", steps=2, model=tiny_chat_model)
    config.sft_weight = 0.5
    train_lib.run(config)
    for m in _metrics(tmp_path / "mixed"):
        assert 0 < m["sft_loss"] < 20  # a random model's cross-entropy: about ln(49152) = 10.8 nats per token
        assert m["loss"] >= 0.5 * m["sft_loss"]  # plus the (non-negative) forward KL


def test_a_finished_run_loads_by_its_workdir_as_its_final_model_and_exports(tmp_path, monkeypatch, tiny_chat_model):
    """models.load(workdir) gives the parameters the run ended with (as a teacher, or to sample);
    `python -m jaxdistill export workdir OUT` writes them as a directory transformers loads alone."""
    import torch
    from flax import nnx
    from test_parity import assert_logits_match, reference_logits
    from transformers import AutoModelForCausalLM

    from jaxdistill.errors import RunError
    from jaxdistill.main import main
    from jaxdistill.models import load

    def params(model):
        return [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]

    final = []
    real_evaluate = train_lib.evaluate
    monkeypatch.setattr(train_lib, "evaluate", lambda model, *a, **k: final.append(params(model))
                        or real_evaluate(model, *a, **k))
    config = tiny_run_config(tmp_path / "run", steps=2, model=tiny_chat_model)
    config.eval.before = config.eval.after = True
    config.log = {"wandb": "jaxdistill-tests"}  # and TensorBoard, always
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # a run that has started, not finished
    with pytest.raises(RunError, match="not a finished jaxdistill training run"):
        load(tmp_path / "run")
    train_lib.run(config)
    trained, tokenizer = load(tmp_path / "run")
    base = params(load(tiny_chat_model)[0])
    moved = 0
    for ours, theirs, before in zip(params(trained), final[-1], base, strict=True):
        np.testing.assert_array_equal(ours, theirs)
        moved += not np.array_equal(ours, before)
    assert moved > 0 and tokenizer.eos_ids

    losses = {row["step"]: row["loss"] for row in _metrics(tmp_path / "run")}
    board = read_board(tmp_path / "run")
    assert board["scalars"]["loss"] == pytest.approx(losses)
    held_out = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    assert board["scalars"]["eval/accuracy"] == pytest.approx({0: held_out["before"]["accuracy"],
                                                               2: held_out["after"]["accuracy"]})
    assert "| after |" in board["text"]["summary/text_summary"]
    wandb_log = b"".join(p.read_bytes() for p in (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"loss" in wandb_log and b"eval/accuracy" in wandb_log  # the same scalars, for W&B to sync

    assert main(["jaxdistill", "export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported, _ = load(tmp_path / "hf")
    for ours, theirs in zip(params(exported), params(trained), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = tokenizer.chat([{"role": "user", "content": "What is 2 + 3?"}])
    assert_logits_match(trained(jnp.asarray([ids]))[0], reference_logits(reference, ids))


def test_samples_per_problem_samples_each_problem_that_many_times(tmp_path, monkeypatch, tiny_chat_model):
    config = tiny_run_config(tmp_path / "samples", steps=1, model=tiny_chat_model)
    config.samples_per_problem = 3
    seen = []
    real_build = step_lib.build_batch

    def record(student, teacher, completions, **kwargs):
        seen.append((student, teacher, completions))
        return real_build(student, teacher, completions, **kwargs)

    monkeypatch.setattr(step_lib, "build_batch", record)
    train_lib.run(config)
    (student, teacher, completions), = seen
    assert len(completions) == 3 and student[0] == student[1] == student[2] and teacher[0] == teacher[2]
    assert _metrics(tmp_path / "samples")[0]["generated_tokens"] == sum(len(c) for c in completions)
    config.arm = "sft"
    with pytest.raises(ValueError, match="samples_per_problem"):
        train_lib.run(config)


def test_guided_generation_keeps_student_and_teacher_rows_in_step():
    from jaxdistill import sampling

    paired = [[3, 4], [3, 4, 9, 9, 9], [5, 6, 7], [5, 6, 7, 8]]  # (student, teacher) of two problems
    out = sampling.generate(tiny_model(), paired, max_new_tokens=12,
                            rule=rollouts.GuidedRule(0.75, 1.0), rng=5, eos_ids=(2,))
    seqs = out.sequences()
    assert seqs[0::2] == seqs[1::2]  # each pair shares its tokens and its stop
    assert out.logprobs[0].tolist() != out.logprobs[1].tolist()  # but each row reports its own log-probs


def test_evaluation_row_on_smollm2_has_a_positive_hint_uplift_and_mean_at_k(smollm2):
    from jaxdistill.distill.evaluate import evaluate, format_table

    model, tok = smollm2
    records = synthetic_records(4, seed=1, split="test")
    row = evaluate(model, tok, records, max_new_tokens=8, batch_size=4, mean_at_k=2)
    assert set(row) >= {"accuracy", "accuracy_teacher", "hint_uplift_logp", "kl_teacher_student", "entropy",
                        "length", "mean@2"}
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["mean@2"] <= 1
    # seeing the reference solution makes the teacher context predict that very solution far better
    assert row["hint_uplift_logp"] > 0.5
    assert row["kl_teacher_student"] > 0 and row["entropy"] > 0 and 0 < row["length"] <= 8
    per_problem = row.pop("per_problem")  # each record's outcomes, which the row averages
    assert len(per_problem["correct"]) == len(per_problem["length"]) == 4
    assert np.mean(per_problem["correct"]) == pytest.approx(row["accuracy"], abs=1e-4)
    assert np.mean(per_problem["length"]) == pytest.approx(row["length"])
    assert "| before |" in format_table({"before": row})


def test_controls_no_hint_gives_zero_loss_and_wrong_hint_shows_another_solution(smollm2):
    from flax import nnx

    model, tok = smollm2
    problems = synthetic_records(2, seed=5)
    none = rollouts.hinted_pairs(tok, problems, 1, PromptConfig(), "none")
    assert all(student == teacher for student, teacher in none)
    wrong = rollouts.hinted_pairs(tok, problems, 2, PromptConfig(), "wrong")
    assert len(wrong) == 4 and wrong[0] == wrong[1]
    assert problems[1].solution in tok.decode(wrong[0][1]) and problems[0].solution not in tok.decode(wrong[0][1])
    completions = [tok.encode("Let me think. " + r.solution, add_special_tokens=False) + [tok.turn_end_id]
                   for r in problems]
    b = step_lib.build_batch([p[0] for p in none], [p[1] for p in none], completions, pad_id=tok.pad_id,
                             end_ids=tok.eos_ids)
    graphdef, params = nnx.split(model)
    value, stats = step_lib.distill_loss(graphdef, params, None, b, TargetConfig(),
                                         LossConfig(chunk=32))
    # no hint: teacher = student, so the entropy-matched blend is the student itself
    assert abs(float(value)) < 1e-5 and float(stats["kl_teacher_student"]) < 1e-6
    # the end statistics are the student's probability of the end token where each sample ends
    logits = model(jnp.asarray(b["tokens"][0::2]), None, jnp.asarray(b["mask"][0::2]))
    width = b["tokens"].shape[1] - b["target_mask"].shape[1]
    for row, completion in enumerate(completions):
        p_end = jax.nn.softmax(logits[row, width + len(completion) - 2])[tok.turn_end_id]
        assert float(stats["end_p_student"][row]) == pytest.approx(float(p_end), rel=1e-3)
        assert float(stats["end_p_target"][row]) == pytest.approx(float(p_end), rel=1e-3)
    assert len(stats["kl_by_position"]) == -(-b["target_mask"].shape[1] // step_lib.KL_BUCKET)


def test_sparse_target_loss_is_the_kl_to_the_renormalised_top_k_and_padding_adds_no_nan():
    from flax import nnx

    model = tiny_model()
    b = step_lib.build_batch(STUDENT, None, COMPLETIONS, pad_id=0, multiple=8, end_ids=[2])
    rows, width, k = len(COMPLETIONS), b["target_mask"].shape[1], 5
    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.config.vocab_size, size=(rows, width, k)).astype(np.int32)
    ids[0, 3, 1] = 2  # the target proposes the end token where row 0 ends
    logprobs = rng.normal(size=(rows, width, k)).astype(np.float32)
    logprobs[1, len(COMPLETIONS[1]):] = -np.inf  # padding positions: no target at all
    logprobs[0, 0, -1] = -np.inf  # a token outside the kept mass
    b |= {"target_ids": ids, "target_logprobs": logprobs}
    graphdef, params = nnx.split(model)
    (value, stats), grads = jax.value_and_grad(lambda p: step_lib.sparse_distill_loss(graphdef, p, None, b),
                                               has_aux=True)(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    logits = np.asarray(model(jnp.asarray(b["tokens"]), None, jnp.asarray(b["mask"])))
    width_p = b["tokens"].shape[1] - width
    expected = []
    for r, completion in enumerate(COMPLETIONS):
        for j in range(len(completion)):
            log_s = logits[r, width_p - 1 + j] - np.logaddexp.reduce(logits[r, width_p - 1 + j])
            keep = np.isfinite(logprobs[r, j])
            lt = logprobs[r, j, keep] - np.logaddexp.reduce(logprobs[r, j, keep])
            expected.append(np.sum(np.exp(lt) * (lt - log_s[ids[r, j, keep]])))
            if r == 0 and j == 3:  # where row 0 ends: the end token under the student and the target
                assert float(stats["end_p_student"][0]) == pytest.approx(np.exp(log_s[2]), rel=1e-4)
                assert float(stats["end_p_target"][0]) == pytest.approx(np.exp(lt[ids[r, j, keep] == 2]).sum(),
                                                                        rel=1e-4)
    assert float(value) == pytest.approx(np.mean(expected), rel=1e-4)
    assert float(stats["end_p_student"][1]) == float(stats["end_p_target"][1]) == 0.0  # row 1 never ends


@pytest.mark.slow
def test_the_teacher_stack_trains_the_student_as_a_sparse_target(tmp_path, tiny_chat_model, tiny_gemma_model):
    """arm=stack through the loop: SmolLM2's vocabulary (chat and few-shot) and Gemma 3's (few-shot) as
    frozen teachers of the student, on small random weights (the loop's machinery)."""
    config = tiny_run_config(tmp_path / "stack", steps=2, model=tiny_chat_model)
    config.arm, config.hint = "stack", "reference"
    config.stack = {"teachers": [dict(name="chat", model=str(tiny_chat_model), style="chat"),
                                 dict(name="fewshot", model=str(tiny_chat_model), style="fewshot"),
                                 dict(name="gemma", model=str(tiny_gemma_model), style="fewshot")],
                    "hint": True, "rule": "mean_probs", "top_k": 10, "record_top": 20, "width": 2,
                    "fewshot_examples": 2, "fewshot_ends_turn": False}
    train_lib.run(config)
    rows = _metrics(tmp_path / "stack")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["loss"] > 0 and np.isfinite(r["grad_norm"])
                                  for r in rows)
    assert all("end_p_student" in r and "end_p_target" in r for r in rows)  # the end push is logged here too


def test_fewshot_prompts_for_a_base_model_stop_at_the_blank_line(gemma3):
    """Gemma 3 270M few-shot: pCoT and pTeacher share the examples and end at "Solution:\\n"; the
    reply stops at the blank line, so evaluation sees finished replies."""
    from jaxdistill import prompts as prompt_lib
    from jaxdistill.distill.evaluate import evaluate

    model, tok = gemma3
    train = synthetic_records(2, 0)
    config = prompt_lib.PromptConfig(style="fewshot", examples=tuple((r.problem, r.solution) for r in train))
    record = synthetic_records(3, 0, split="test")[0]
    student, teacher = (tok.decode(ids) for ids in prompt_lib.prompt_pair(tok, record, config))
    assert student.endswith(f"Problem: {record.problem}\nSolution:\n") and teacher.endswith("#### "
                                                                                           f"{record.answer}\nSolution:\n")
    assert teacher.startswith(student[: student.index(f"Problem: {record.problem}")])  # the same examples
    blank = tok.encode("\n\n", add_special_tokens=False)[0]
    assert blank in prompt_lib.stop_ids(tok, config) and prompt_lib.end_id(tok, config) == blank
    row = evaluate(model, tok, synthetic_records(4, 0, split="test"), prompt_config=config, max_new_tokens=64,
                   batch_size=4)
    assert row["ended"] > 0.5 and row["length"] < 64  # the examples teach it to stop
    assert row["accuracy_teacher"] >= row["accuracy"]
