"""Smoke runs of benchmark scripts that CI cannot otherwise exercise (they target a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mfu_benchmark_runs_on_a_tiny_model_and_reports_a_plausible_mfu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distill_mfu.py"), "--preset=tiny", "--peak-tflops=100",
         "--problems=2", "--prompt=16", "--hint=8", "--generated=16", "--steps=1"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["rows"] == 4 and result["params"] > 4_000_000
    assert 0 < result["mfu"] < 1 and result["first_loss"] > 0


def test_the_pytorch_side_of_the_step_benchmark_forms_our_target():
    """benchmarks/distill_step.py compares the steps, not the solvers: its PyTorch target is ours."""
    import importlib.util

    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxdistill.distill.targets import blend_logits

    spec = importlib.util.spec_from_file_location("distill_step", ROOT / "benchmarks" / "distill_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    teacher, student = (rng.normal(size=(3, 5, 200)).astype(np.float32) * scale for scale in (4.0, 2.0))
    student[0, 0] *= 30  # a near-deterministic student row
    ours = np.asarray(blend_logits(jnp.asarray(teacher), jnp.asarray(student)))
    theirs = bench.torch_entropy_matched_target(torch.tensor(teacher), torch.tensor(student)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
