"""Peak host memory of exporting a model to a Hugging Face directory: streaming vs gathering it whole.

    .venv/bin/python benchmarks/export.py                      # the 317M-parameter Llama shape of loading.py
    .venv/bin/python benchmarks/export.py --layers=4 --hidden=512

Loads a random bfloat16 checkpoint (written with transformers) into bfloat16 parameters, on one
CPU device and on an fsdp mesh of 8, then, in the same fresh process, measures the peak resident
memory above the level after loading while exporting it in bfloat16:
- `models.export.save_hf`: one tensor (one layer's slice) gathered, converted and written at a time;
- the reference a user would otherwise write: every tensor gathered into a dict, then
  `safetensors.numpy.save_file` (what `save_pretrained` of a whole state dict amounts to).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import printout
from loading import MEMORY_PROBE, shape_arguments, write_checkpoint

WORKER = MEMORY_PROBE + r"""
import json, sys, time
from pathlib import Path
import jax, jax.numpy as jnp
import ml_dtypes
from jaxdistill import mesh as mesh_lib
from jaxdistill.models import export, loading, streaming
path, how, on_mesh, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "mesh", Path(sys.argv[4])
mesh = mesh_lib.make_mesh({"fsdp": -1}) if on_mesh else None
model = streaming.load_hf_streaming(path, loading.read_config(path), dtype=jnp.bfloat16, mesh=mesh)
jax.block_until_ready(jax.tree.leaves(model))
base = reset_peak()
tick = time.perf_counter()
if how == "streaming":
    export.save_hf(model, None, out, dtype="bfloat16")
else:
    from safetensors.numpy import save_file
    tensors = {name: read() for name, _, read in export.hf_tensors(model, ml_dtypes.bfloat16)}
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
seconds = time.perf_counter() - tick
params = sum(x.size for x in jax.tree.leaves(model))
print(json.dumps({"params": params, "peak": rss("VmHWM") - base, "seconds": seconds}))
"""


def measure(path: Path, how: str, where: str, out: Path) -> dict:
    devices = 8 if where == "mesh" else 1
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-c", WORKER, str(path), how, where, str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"export ({how}, {where}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = shape_arguments(__doc__)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint"
        write_checkpoint(path, args)
        for where in ("one device", "mesh"):
            for how in ("gather whole, save_file", "streaming"):
                rows[(how, where)] = measure(path, how.split(",")[0], where.split()[0],
                                             Path(tmp) / f"out-{len(rows)}")
    params = rows[("streaming", "one device")]["params"]
    print(f"model: {params / 1e6:.0f}M parameters in bfloat16 (2 bytes each on the host-CPU devices)")
    print("| export | parameters on | peak RSS above the loaded model, bytes/param | seconds | peak vs whole |")
    print("|---|---|---:|---:|---:|")
    for (how, where), r in rows.items():
        reference = rows[("gather whole, save_file", where)]["peak"]
        print(f"| {how} | {'fsdp 8' if where == 'mesh' else where} | {r['peak'] / params:.2f} | "
              f"{r['seconds']:.1f} | {r['peak'] / reference:.2f} |")


if __name__ == "__main__":
    printout.run(main)
