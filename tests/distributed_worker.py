"""One process of the two-process test: python distributed_worker.py PORT PROCESS_ID OUT.npy

Each process has 4 fake CPU devices; together they form a 2x2x2 (data, fsdp, tensor) mesh.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
port, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

from jaxdistill import mesh as mesh_lib  # noqa: E402

mesh_lib.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from helpers import tiny_model  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
model = mesh_lib.shard_model(tiny_model(seed=0), mesh)
tokens = np.random.default_rng(0).integers(0, 64, size=(4, 12)).astype(np.int32)
local_rows = tokens[2 * process_id : 2 * process_id + 2]  # this process's half of the global batch
batch = mesh_lib.host_to_global(local_rows, mesh)
logits = jax.jit(lambda m, x: m(x))(model, batch)
gathered = multihost_utils.process_allgather(logits, tiled=True)
np.save(out, np.asarray(gathered))

# Sampling this process's rows: repeated prompts share their prefill across processes, and
# rows that end early leave the batch (compaction) while the others decode on.
from helpers import SAMPLING_PROMPTS, SAMPLING_SETTINGS  # noqa: E402

from jaxdistill import sampling  # noqa: E402

mine = SAMPLING_PROMPTS[8 * process_id : 8 * process_id + 8]
generated = sampling.generate(model, mine, mesh=mesh, **SAMPLING_SETTINGS)
np.save(out.replace(".npy", "_tokens.npy"), generated.tokens)
