"""Smoke runs of benchmark scripts that CI cannot otherwise exercise (they target a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mfu_benchmark_runs_on_a_tiny_model_and_reports_a_plausible_mfu(tmp_path, monkeypatch):
    """With --record, its printout is kept as a record that docs_tables renders (the flag itself
    never reaches the benchmark's parser)."""
    kept = tmp_path / "mfu.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distill_mfu.py"), "--preset=tiny", "--peak-tflops=100",
         "--problems=2", "--prompt=16", "--hint=8", "--generated=16", "--steps=1", f"--record={kept}"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["rows"] == 4 and result["params"] > 4_000_000
    assert 0 < result["mfu"] < 1 and result["first_loss"] > 0
    record = json.loads(kept.read_text())
    assert record["output"] == out.splitlines() and "--record" not in record["command"]
    assert record["command"].startswith("python ") and record["command"].endswith("--generated=16 --steps=1")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import docs_tables

    shown = docs_tables.generate(f"benchmark record={kept} table=all")
    assert shown.startswith(f"```\n$ {record['command']}\n") and "RESULT {" in shown
    assert f"at {record['commit'][:10]}, {record['date']}" in shown
    with pytest.raises(ValueError, match="printed 0 table"):
        docs_tables.generate(f"benchmark record={kept} table=1")


def test_a_printout_s_tables_are_its_markdown_lines_and_a_failed_run_keeps_no_record(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import printout

    def bench():
        print("setup line\n| a | b |\n|---|---:|\n| x | 1 |\n\nratio 2x\n| c |\n|---|")

    monkeypatch.setattr(sys, "argv", ["benchmarks/fake.py", "--n=2", f"--record={tmp_path / 'ok.json'}"])
    printout.run(bench)
    record = json.loads((tmp_path / "ok.json").read_text())
    assert record["command"] == "python benchmarks/fake.py --n=2"
    assert printout.tables(record["output"]) == [["| a | b |", "|---|---:|", "| x | 1 |"], ["| c |", "|---|"]]
    assert printout.table(record, "2").startswith("| c |\n|---|\n\n`python benchmarks/fake.py --n=2` at ")

    def broken():
        print("| a |")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sys, "argv", ["benchmarks/fake.py", f"--record={tmp_path / 'failed.json'}"])
    stdout = sys.stdout
    with pytest.raises(RuntimeError):
        printout.run(broken)
    assert not (tmp_path / "failed.json").exists() and sys.stdout is stdout


def test_the_pytorch_side_of_the_step_benchmark_forms_our_target(monkeypatch):
    """benchmarks/distill_step.py compares the steps, not the solvers: its PyTorch target is ours."""
    import importlib.util

    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxdistill.distill.targets import blend_logits

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmark imports its neighbour printout
    spec = importlib.util.spec_from_file_location("distill_step", ROOT / "benchmarks" / "distill_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    teacher, student = (rng.normal(size=(3, 5, 200)).astype(np.float32) * scale for scale in (4.0, 2.0))
    student[0, 0] *= 30  # a near-deterministic student row
    ours = np.asarray(blend_logits(jnp.asarray(teacher), jnp.asarray(student)))
    theirs = bench.torch_entropy_matched_target(torch.tensor(teacher), torch.tensor(student)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
