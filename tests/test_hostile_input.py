"""Careless and hostile input: each case either works or stops early with one clear message.

Every test here reproduces a failure found on an earlier main (issue 13): lost checkpoints,
duplicated metrics lines, two runs on one work directory, NaN router runs, damaged
checkpoints, unreachable data sources and raw tracebacks.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import read_board, tiny_model
from test_distill import tiny_run_config

from jaxdistill import runs, sampling
from jaxdistill.data import DataError, read_jsonl
from jaxdistill.distill import train as train_lib
from jaxdistill.errors import ConfigError, RunError
from jaxdistill.main import main
from jaxdistill.models import ConfigError as ModelConfigError
from jaxdistill.models import load

ROOT = Path(__file__).parent.parent


def metric_steps(workdir):
    return [json.loads(line)["step"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jaxdistill", *args], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env={**os.environ, "XLA_FLAGS": "", **(env or {})})


# ----------------------------------------------------------------------------- checkpoints and metrics


def test_a_crash_right_after_a_checkpoint_save_keeps_that_checkpoint(tiny_chat_model, tmp_path):
    """The process dies (an error propagates to exit) while the step-1 save is still being written."""
    config = tiny_run_config(tmp_path / "run", steps=3, model=tiny_chat_model)
    config.checkpoint.every = 1
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import json, sys
        from ml_collections import config_dict
        from jaxdistill.distill import train
        config = config_dict.ConfigDict(json.loads({json.dumps(json.dumps(config.to_dict()))}))
        real, calls = train.sample_completions, []
        def crash_on_second_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated failure in step 2")
            return real(*args, **kwargs)
        if sys.argv[1] == "crash":
            train.sample_completions = crash_on_second_step
        train.run(config)
    """))
    crashed = subprocess.run([sys.executable, str(driver), "crash"], capture_output=True, text=True, timeout=900)
    assert crashed.returncode != 0 and "simulated failure in step 2" in crashed.stderr
    assert checkpoint_steps(tmp_path / "run") == [1]  # the save in flight when step 2 failed is complete
    rerun = subprocess.run([sys.executable, str(driver), "normal"], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from step 1" in rerun.stdout
    assert metric_steps(tmp_path / "run") == [1, 2, 3]


def test_metrics_lines_past_the_restored_checkpoint_are_dropped_on_resume(tiny_chat_model, tmp_path):
    """kill -9 after step 3 wrote its metrics line but before its checkpoint: no step appears twice."""
    workdir = tmp_path / "run"
    config = tiny_run_config(workdir, steps=3, model=tiny_chat_model)
    train_lib.run(config)  # checkpoints at 2 and 3
    assert metric_steps(workdir) == [1, 2, 3]
    import shutil

    shutil.rmtree(workdir / "checkpoints" / "3")  # as if killed before checkpoint 3 was written
    train_lib.run(config)
    assert metric_steps(workdir) == [1, 2, 3]
    assert checkpoint_steps(workdir) == [2, 3]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # TensorBoard likewise: the rerun's step 3 replaces the first one (the writer purges from step 3)
    assert read_board(workdir)["scalars"]["loss"] == pytest.approx({r["step"]: r["loss"] for r in rows})


def test_a_damaged_latest_checkpoint_names_itself_and_the_intact_one(tiny_chat_model, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_run_config(workdir, steps=2, model=tiny_chat_model)
    config.checkpoint.every = 1
    train_lib.run(config)
    assert checkpoint_steps(workdir) == [1, 2]
    for path in (workdir / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    config.steps, config.resume = 3, "ignore_config_changes"  # continue it, deliberately, one step further
    with pytest.raises(RunError, match=r"checkpoints/2 is damaged.*step 1, is intact.*checkpoint.resume_from=1"):
        train_lib.run(config)
    config.checkpoint.resume_from = 1
    train_lib.run(config)
    assert metric_steps(workdir) == [1, 2, 3]
    assert checkpoint_steps(workdir) == [2, 3]


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_stale_lock_is_taken_over(tiny_chat_model, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_run_config(workdir, steps=1, model=tiny_chat_model)
    with runs.WorkdirLock(runs.open_workdir(workdir)):  # a live run: this very process
        with pytest.raises(RunError, match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
            train_lib.run(config)
    assert not (workdir / "metrics.jsonl").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    train_lib.run(config)  # the lock's process is gone: the run takes it over
    assert metric_steps(workdir) == [1] and not (workdir / ".lock").exists()


def test_an_unwritable_workdir_fails_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the work directory should be")
    monkeypatch.setattr(train_lib, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RunError, match="not writable"):
        train_lib.run(tiny_run_config(blocker / "run"))


# ----------------------------------------------------------------------------- data


def test_an_overlong_record_is_refused_before_the_model_loads_or_skipped_when_asked(tiny_chat_model, tmp_path,
                                                                                    monkeypatch):
    data = tmp_path / "data.jsonl"
    normal = [{"prompt": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}.\n#### {i + 1}"} for i in range(8)]
    huge = {"prompt": "Summarise: " + "word " * 53_000, "solution": "#### 1"}
    data.write_text("".join(json.dumps(r) + "\n" for r in normal[:2] + [huge] + normal[2:]))
    config = tiny_run_config(tmp_path / "run", steps=1, model=tiny_chat_model)
    config.data = {"source": "jsonl", "train_path": str(data), "eval_path": "", "eval_size": 2}
    real_load = train_lib.load
    monkeypatch.setattr(train_lib, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError, match=r"1 of 7 training records do not fit in 2048 tokens.*overlong=skip"):
        train_lib.run(config)
    monkeypatch.setattr(train_lib, "load", real_load)
    config.data.overlong = "skip"
    train_lib.run(config)
    assert metric_steps(tmp_path / "run") == [1]


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "solution": "#### 1"}\n{"prompt": "caf\xe9", "solution": "#### 2"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(path)


def test_jsonl_source_runs_through_the_cli_with_the_shipped_config(tmp_path, tiny_chat_model):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} pens and buys 2. How many now?",
                                        "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n" for i in range(6)))
    result = cli("train", "--config=experiments/self_distill/default.py", f"--config.workdir={tmp_path / 'run'}",
                 f"--config.model={tiny_chat_model}", "--config.data.source=jsonl", f"--config.data.train_path={data}",
                 "--config.data.eval_size=2",
                 "--config.steps=1", "--config.optim.warmup_steps=0", "--config.batch_size=1",
                 "--config.sample.max_new_tokens=8", "--config.eval.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out evaluation (2 problems)" in result.stdout
    assert metric_steps(tmp_path / "run") == [1]


TFDS_BUILDER = """
import sys
import tensorflow_datasets as tfds

class Gsm8k(tfds.core.GeneratorBasedBuilder):  # GSM8K's fields, written offline as a user would prepare it
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"question": f"Ana has {i} coins and finds 3. How many now?",
                      "answer": f"{i} + 3 = {i + 3}\\n#### {i + 3}"}

Gsm8k(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
"""


def test_tfds_source_runs_through_the_cli_with_the_shipped_config(tmp_path, tiny_chat_model):
    prepared = subprocess.run([sys.executable, "-c", TFDS_BUILDER, str(tmp_path / "tfds")], capture_output=True,
                              text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    # A subprocess, like a user's run (the data path's test: SmolLM2's tokenizer on a small random model).
    result = cli("train", "--config=experiments/self_distill/default.py", f"--config.workdir={tmp_path / 'run'}",
                 f"--config.model={tiny_chat_model}", "--config.data.source=tfds", "--config.data.tfds_name=gsm8k",
                 f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.data.eval_size=2", "--config.steps=1",
                 "--config.optim.warmup_steps=0", "--config.batch_size=2", "--config.sample.max_new_tokens=8",
                 "--config.eval.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out evaluation (2 problems)" in result.stdout
    assert metric_steps(tmp_path / "run") == [1]


# ----------------------------------------------------------------------------- settings and the CLI


def run_main(capsys, *args):
    code = main(["jaxdistill", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("steps", [2, 0, -3])
def test_steps_not_above_warmup_names_both(capsys, tmp_path, steps):
    code, _, err = run_main(capsys, "train", "--config=experiments/self_distill/default.py",
                            f"--config.workdir={tmp_path}", f"--config.steps={steps}")
    assert code == 2
    assert ("warmup_steps (2) must be below steps" in err) if steps == 2 else (f"steps must be >= 1, got {steps}"
                                                                              in err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides,message", [
    (["--config.sft_weight=-1"], "sft_weight must be >= 0, got -1"),
    (["--config.arm=sft", "--config.sft_weight=0.5"], "arm='sft' has none (use arm=blend, fixed_k or teacher"),
])
def test_sft_weight_outside_a_distillation_arm_is_refused(capsys, tmp_path, overrides, message):
    code, _, err = run_main(capsys, "train", "--config=experiments/self_distill/default.py",
                            f"--config.workdir={tmp_path}", *overrides)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("command,overrides,message", [
    ("train", ["--config.data.train_path=/etc/hostname"], "data.train_path is set ('/etc/hostname') but only "
     "data.source=jsonl reads it and data.source is 'synthetic'; add --config.data.source=jsonl"),
    ("train", ["--config.fixed_k=2"], "fixed_k is set (2.0) but only arm=fixed_k reads it and arm is 'blend'"),
    ("train", ["--config.arm=teacher", "--config.teacher_weight=0.5"], "arm='teacher' does not read it"),
    ("train", ["--config.loss.jsd_beta=0.2"], "only loss.kind=jsd reads it and loss.kind is 'forward_kl'"),
    ("train", ["--config.arm=sft", "--config.sample.temperature=1.0"], "arm='sft' samples nothing"),
    ("train", ["--config.stack.rule=gated"], "only arm=stack reads it and arm is 'blend'; add --config.arm=stack"),
    ("route", ["--config.data.test_path=dev.jsonl"], "data.test_path is set ('dev.jsonl') but only "
     "data.source=jsonl reads it and data.source is 'synthetic'"),
])
def test_a_setting_the_run_would_not_read_is_refused_by_name(capsys, tmp_path, command, overrides, message):
    config = {"train": "experiments/self_distill/default.py", "route": "experiments/router/default.py"}[command]
    code, _, err = run_main(capsys, command, f"--config={config}", f"--config.workdir={tmp_path / 'w'}", *overrides)
    assert code == 2 and message in err, err
    assert not (tmp_path / "w").exists()  # refused before any work, even the work directory


def test_cli_errors_are_one_line_and_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--config=/nonexistent.py")
    assert code == 2 and "config file '/nonexistent.py' does not exist" in err and "Traceback" not in err
    code, _, err = run_main(capsys, "train")
    assert code == 2 and "--config=experiments/self_distill/default.py" in err
    code, _, err = run_main(capsys, "route", "--config=experiments/router/default.py", "--config.nope=1")
    assert code == 2 and "unknown config key 'nope'" in err
    code, _, err = run_main(capsys, "route", "--config=experiments/router/default.py", "--config.env.alpah=1")
    assert code == 2 and 'Did you mean "env.alpha"' in err
    code, _, err = run_main(capsys, "train", "--config=experiments/self_distill/default.py",
                            f"--config.workdir={tmp_path}", "--config.steps=0", "--verbose")
    assert code == 2 and "Traceback" in err and "steps must be >= 1" in err


@pytest.mark.parametrize("command,field", [("train", "optim.warmup_steps = 2"), ("route", "env.alpha = 0.1"),
                                           ("sample", "sample.temperature = 0.0")])
def test_command_help_lists_config_fields_and_defaults(capsys, command, field):
    code, out, _ = run_main(capsys, command, "--help")
    fields = {" ".join(line.split()) for line in out.splitlines()}
    assert code == 0 and field in fields and f"python -m jaxdistill {command}" in out


@pytest.mark.parametrize("override,message", [
    ("--config.precompute.t_max=0", "precompute.t_max must be >= 1"),
    ("--config.env.alpha=-1", "must be >= 0"),
    ("--config.knn_k=500", "knn_k=500 exceeds the 128 training questions"),
])
def test_router_settings_are_refused_before_any_model_or_ppo_work(capsys, tmp_path, monkeypatch, override, message):
    from jaxdistill.router import run as route

    monkeypatch.setattr(route, "ExpertPool", lambda *a, **k: pytest.fail("experts were loaded"))
    code, _, err = run_main(capsys, "route", "--config=experiments/router/default.py",
                            f"--config.workdir={tmp_path / 'route'}", override)
    assert code == 2 and message in err, err
    assert not (tmp_path / "route" / "metrics.jsonl").exists() and not (tmp_path / "route" / "policy").exists()


# ----------------------------------------------------------------------------- models and the sampler


def test_hf_config_missing_a_field_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelConfigError, match=r"config.json has no 'num_attention_heads' field"):
        load(tmp_path)


def test_mixture_of_experts_checkpoints_are_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 128}))
    with pytest.raises(ModelConfigError, match="mixture-of-experts.*supported \\(dense\\): llama"):
        load(tmp_path)


def test_sampler_refuses_token_ids_outside_the_vocabulary():
    model = tiny_model()  # vocabulary of 64
    with pytest.raises(ValueError, match="token id 64, outside the model's vocabulary of 64"):
        sampling.generate(model, [[1, 2], [3, 64]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id -1"):
        sampling.generate(model, [[-1, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="flat list of token ids"):
        sampling.generate(model, [np.array([0.5, 1.0])], max_new_tokens=2)


def test_config_error_types_are_user_errors():
    from jaxdistill.errors import UserError

    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError) and issubclass(RunError, UserError)
    assert ModelConfigError is ConfigError
