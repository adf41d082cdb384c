"""Compile every shipped pod preset for its target at 2k, 8k and 16k tokens of context, keep the
compiled memory reports as records, and write docs/scale.md's table from them.

    python scripts/scale_table.py                       # compile what has no record yet, then the table
    python scripts/scale_table.py --gpu-python=/path/to/venv-with-jax-cuda/bin/python
    python scripts/scale_table.py --report              # the table from the committed records only

TPU targets compile with this venv's libtpu (the test extras); GPU targets need jax's CUDA
build (`scripts/setup.sh --accelerator gpu`, 5.6 GB), which --gpu-python points at. Each record
(docs/scale/compile/*.json) holds the command, the commit, the per-program memory and the
compile time on the machine that ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs/scale/compile"
DOC = ROOT / "docs/scale.md"
PROMPT = 512  # prompt tokens (with the hint) every row assumes
# preset -> the model shape it is sized for (its target is the preset's compile.target)
PRESETS = {"qwen3_1p7b_gpu1": "qwen3-1.7b", "qwen3_8b_gpu8": "qwen3-8b", "qwen3_8b_v5p64": "qwen3-8b",
           "qwen3_8b_8k_v5p64": "qwen3-8b", "qwen3_32b_v5p128": "qwen3-32b", "qwen3_32b_h200x8": "qwen3-32b"}
CONTEXTS = ("shipped", 2048, 8192, 16384)  # prompt + generated tokens; "shipped": the preset's own lengths
# the largest model each big target takes: a preset's mesh and sizes with a larger model
PROBES = (("qwen3_32b_v5p128", "llama3-70b", 2048), ("qwen3_32b_h200x8", "llama3-70b", 2048))
# LoRA against full fine-tuning, the Qwen3-8B job at its shipped lengths: variant -> overrides
# (the full-parameter row on 8 GPUs is the preset's own shipped record)
LORA_PRESET = "qwen3_8b_gpu8"
ONE_GPU = ["--target=h100:1", "--config.mesh.fsdp=1"]
LORA = {"lora16": ["--config.lora.rank=16"], "full-h100x1": ONE_GPU,
        "lora16-h100x1": [*ONE_GPU, "--config.lora.rank=16"]}


def record_path(preset: str, context: int | str, model: str = "", variant: str = "") -> Path:
    return RECORDS / f"{preset}{'-' + model if model else ''}{'-' + variant if variant else ''}-{context}.json"


def command(preset: str, context: int | str, python: str, out: Path, model: str = "", variant: str = "") -> list[str]:
    lengths = [] if context == "shipped" else [f"--config.sample.max_new_tokens={context - PROMPT}",
                                               f"--config.eval.max_new_tokens={context - PROMPT}"]
    return [python, "-m", "jaxdistill", "compile", f"--config=experiments/self_distill/{preset}.py",
            f"--config.model={model or PRESETS[preset]}", f"--config.compile.prompt_tokens={PROMPT}", *lengths,
            *LORA.get(variant, []), f"--out={out}"]


def run(preset: str, context: int | str, python: str, model: str = "", variant: str = "") -> None:
    out = record_path(preset, context, model, variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(preset, context, python, out, model, variant)
    shown = " ".join(["python", *cmd[1:-1]])
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - start
    if not out.exists():  # it failed before compiling anything
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = json.loads(out.read_text()) | {"preset": preset, "model": model or PRESETS[preset],
                                            "context": context, "command": shown,
                                            "commit": commit, "seconds": round(seconds, 1),
                                            "error": done.stderr.strip().splitlines()[-1] if done.returncode else ""}
    out.write_text(json.dumps(record, indent=1))
    print(f"  {'fits' if not done.returncode else 'DOES NOT FIT'} ({seconds:.0f}s)", flush=True)


def table() -> str:
    rows = ["| preset | model | target | context | train step | rollout decode | eval score | largest program "
            "(args + new outputs + temp + code) | device | fits (≥10% free) | compile time |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    cases = [(p, c, "") for p in PRESETS for c in CONTEXTS] + list((p, c, m) for p, m, c in PROBES)
    for preset, context, model in cases:
        path = record_path(preset, context, model)
        if path.exists():
            r = json.loads(path.read_text())
            programs = {p["program"]: p for p in r["programs"]}
            peak = {name: gib(p["peak_bytes"]) for name, p in programs.items()}
            worst = max(r["programs"], key=lambda p: p["peak_bytes"])
            fresh = worst["output_bytes"] - worst["alias_bytes"]  # outputs that do not reuse donated arguments
            parts = "+".join(gib(v) for v in (worst["argument_bytes"], fresh, worst["temp_bytes"], worst["code_bytes"]))
            shown = f"{PROMPT + config(preset).sample.max_new_tokens} (shipped)" if context == "shipped" else context
            fits = "yes" if all(p["fits"] for p in r["programs"]) else "NO"
            programs_shown = (peak.get(n, "–") for n in ("train_step", "rollout_decode", "eval_score"))
            cells = [preset, model or PRESETS[preset], r["target"], shown, *programs_shown,
                     f"{worst['program']} {gib(worst['peak_bytes'])} ({parts})", gib(worst["device_memory"]), fits,
                     f"{r['seconds']:.0f}s"]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def lora_table() -> str:
    """Per-device GiB of the Qwen3-8B job with every weight training and with rank-16 LoRA."""
    rows = ["| training | target | train step | its arguments (state) | its temporaries | largest program | fits "
            "(≥10% free) |", "|---|---|---|---|---|---|---|"]
    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    for variant, what in (("", "every weight (AdamW)"), ("lora16", "LoRA rank 16"),
                          ("full-h100x1", "every weight (AdamW)"), ("lora16-h100x1", "LoRA rank 16")):
        path = record_path(LORA_PRESET, "shipped", variant=variant)
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        step = next(p for p in r["programs"] if p["program"] == "train_step")
        worst = max(r["programs"], key=lambda p: p["peak_bytes"])
        fits = "yes" if all(p["fits"] for p in r["programs"]) else "NO"
        rows.append(f"| {what} | {r['target']} | {gib(step['peak_bytes'])} | {gib(step['argument_bytes'])} | "
                    f"{gib(step['temp_bytes'])} | {worst['program']} {gib(worst['peak_bytes'])} | {fits} |")
    return "\n".join(rows)


def compile_block() -> str:
    """docs/scale.md's compile table with its legend (scripts/docs_tables.py writes it)."""
    return (f"GiB per device (peak: arguments + outputs + temporaries + code); context = {PROMPT} prompt "
            "tokens + generated tokens (rollout and evaluation). Each row's command is in its record "
            f"(docs/scale/compile/<preset>[-<model>]-<context>.json).\n\n{table()}")


def lora_block() -> str:
    return (f"GiB per device, {LORA_PRESET} (Qwen3-8B, bfloat16 parameters, remat, 16 problems x "
            f"{PROMPT + config(LORA_PRESET).sample.max_new_tokens} tokens); each row's command is in its record "
            f"(docs/scale/compile/{LORA_PRESET}[-variant]-shipped.json).\n\n{lora_table()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-python", default="", help="a python with jax's CUDA build, for the h100/h200 presets")
    parser.add_argument("--report", action="store_true", help="only write the table from the records")
    parser.add_argument("--force", action="store_true", help="recompile presets that have a record")
    args = parser.parse_args()
    if not args.report:
        for preset in PRESETS:
            target = config(preset).compile.target
            python = args.gpu_python if target.startswith("h") else sys.executable
            if not python:
                print(f"skipping {preset} ({target}): pass --gpu-python")
                continue
            for context in CONTEXTS:
                if args.force or not record_path(preset, context).exists():
                    run(preset, context, python)
        for preset, model, context in PROBES:
            python = args.gpu_python if config(preset).compile.target.startswith("h") else sys.executable
            if python and (args.force or not record_path(preset, context, model).exists()):
                run(preset, context, python, model)
        for variant in LORA:
            if args.gpu_python and (args.force or not record_path(LORA_PRESET, "shipped", variant=variant).exists()):
                run(LORA_PRESET, "shipped", args.gpu_python, variant=variant)
    subprocess.run([sys.executable, str(ROOT / "scripts/docs_tables.py"), str(DOC)], check=True)


def config(preset: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(preset, ROOT / "experiments/self_distill" / f"{preset}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


if __name__ == "__main__":
    main()
