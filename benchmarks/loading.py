"""Peak host memory of loading a bfloat16 safetensors checkpoint: streaming vs the whole-file reader.

    .venv/bin/python benchmarks/loading.py                      # a 318M-parameter Llama shape
    .venv/bin/python benchmarks/loading.py --layers=4 --hidden=512

Writes a random checkpoint with transformers (bfloat16 files, untied head), then loads it
in a fresh process each way into bfloat16 parameters and reports the peak resident memory
above the process's level just before loading, per parameter. The parameters themselves
take 2 bytes per parameter on this CPU device; the rest is what loading costs on top.

The last two rows stream onto an fsdp mesh of 8 CPU devices: in one process, and split
over two processes on localhost (4 devices each, jax.distributed), where each process
reads only the slices its own devices hold: the per-process peak should halve.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import printout

# Prepended to each benchmark's worker script: the process's memory, from /proc.
MEMORY_PROBE = r"""
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current level
    return rss("VmRSS")
"""

WORKER = MEMORY_PROBE + r"""
import json, sys, time
from pathlib import Path
import jax, jax.numpy as jnp
path, how, processes, pid, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from jaxdistill import mesh as mesh_lib
from jaxdistill.models import loading, streaming
mesh_lib.initialize_distributed(f"localhost:{port}", processes, pid)
mesh = mesh_lib.make_mesh({"fsdp": -1}) if how == "mesh" else None
jnp.zeros(1).block_until_ready()
base = reset_peak()
tick = time.perf_counter()
if how in ("streaming", "mesh"):
    model = streaming.load_hf_streaming(path, loading.read_config(path), dtype=jnp.bfloat16, mesh=mesh)
else:
    config, weights = loading.read_hf_directory(path)
    state = loading.canonical_to_state(config, weights)
    del weights
    model = loading.build_model(config, state, dtype="bfloat16")
    del state
jax.block_until_ready(jax.tree.leaves(model))
seconds = time.perf_counter() - tick
params = sum(x.size for x in jax.tree.leaves(model))  # global sizes
print(json.dumps({"params": params, "peak": rss("VmHWM") - base, "after": rss("VmRSS") - base,
                  "seconds": seconds}))
"""


def write_checkpoint(path: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")


def load(path: Path, how: str, processes: int, devices: int) -> list[dict]:
    """Each process's measurement, `devices` CPU devices per process."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), how, str(processes), str(pid), port],
                              env=env, stdout=subprocess.PIPE, text=True) for pid in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a loading process failed: {[p.returncode for p in procs]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def shape_arguments(description: str) -> argparse.Namespace:
    """The checkpoint shape both benchmarks take (default: a 317M-parameter Llama)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    return parser.parse_args()


def main() -> None:
    args = shape_arguments(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint"
        write_checkpoint(path, args)
        file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        rows = {how: load(path, how.split()[0], 1, 1)[0] for how in ("whole-file reader", "streaming")}
        rows["streaming, fsdp 8, one process"] = load(path, "mesh", 1, 8)[0]
        for pid, row in enumerate(load(path, "mesh", 2, 4)):
            rows[f"streaming, fsdp 8, process {pid} of 2"] = row
    params = rows["streaming"]["params"]
    print(f"checkpoint: {params / 1e6:.0f}M parameters, {file_bytes / 1e6:.0f} MB of bfloat16 safetensors")
    print("| loader | peak RSS above start, bytes/param | after loading, bytes/param | seconds | peak vs whole-file |")
    print("|---|---:|---:|---:|---:|")
    reference = rows["whole-file reader"]["peak"]
    for how, r in rows.items():
        print(f"| {how} | {r['peak'] / params:.2f} | {r['after'] / params:.2f} | {r['seconds']:.1f} | "
              f"{r['peak'] / reference:.2f} |")


if __name__ == "__main__":
    printout.run(main)
