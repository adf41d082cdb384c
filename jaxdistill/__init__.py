"""jaxdistill: teaching language models from their own and other models' logits."""

import os

# XLA's CPU concurrency-optimised scheduler can wedge (0% CPU, forever) on vmapped scans such
# as the router's PPO run over several seeds (jax 0.10, reproduced here 3 times in 3; the
# same family as jax-ml/jax#24219). The flag must be set before the CPU backend starts.
_XLA_FIX = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FIX}".strip()

# jaxdistill uses transformers for tokenizers only; its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
