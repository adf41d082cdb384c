"""Measured logit parity of our models against transformers' PyTorch models (same GGUF weights).

    .venv/bin/python benchmarks/parity.py

Prints, per model and prompt, the max |ours - reference| over all positions and the whole
vocabulary, divided by max |reference| (the logit scale). The tests require <= 1e-3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import printout
import torch
from transformers import AutoModelForCausalLM

from jaxdistill.models import load
from jaxdistill.models.loading import resolve

PROMPTS = {
    "short": "The capital of France is",
    "long (past Gemma's 512 window)": " ".join(
        f"Step {i}: add {i % 7} to the total, which is now {i * 3}." for i in range(60)
    ),
}


def main():
    print("| model | prompt | tokens | max abs diff | logit scale | relative | argmax agreement |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        model, tok = load(name)
        path = resolve(name)
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        for label, text in PROMPTS.items():
            ids = tok.encode(text)
            ours = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray([ids]))[0])
            with torch.no_grad():
                theirs = ref(torch.tensor([ids])).logits[0].numpy()
            diff, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
            agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
            print(f"| {name} | {label} | {len(ids)} | {diff:.2e} | {scale:.1f} | {diff / scale:.1e} | {agree:.3f} |",
                  flush=True)


if __name__ == "__main__":
    printout.run(main)
