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
