import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_model
from jax.sharding import PartitionSpec as P

from jaxdistill import mesh as mesh_lib
from jaxdistill import sampling
from jaxdistill.models import load

forward = jax.jit(lambda model, ids: model(ids))
TOKENS = np.random.default_rng(0).integers(0, 64, size=(4, 12)).astype(np.int32)


def test_mesh_from_config_fills_missing_axes_and_one_free_axis():
    mesh = mesh_lib.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "teacher": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor", "teacher")
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        mesh_lib.make_mesh({"data": 4, "tensor": 4})
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        mesh_lib.make_mesh({"data": -1, "fsdp": -1})


def test_hybrid_mesh_keeps_each_slice_or_process_a_whole_block_of_the_fast_axes():
    """mesh.dcn: the data axis crosses slices (TPU multi-slice) or processes (GPU nodes); every
    other axis, and each dcn axis's inner part, stays within one slice. Devices stand in as
    objects, as no CPU has slices."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Chip:
        id: int
        process_index: int
        slice_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"

    @dataclasses.dataclass(frozen=True)
    class Gpu:
        id: int
        process_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"

    chips = [Chip(i, process_index=i // 4, slice_index=i // 8) for i in range(32)]  # 4 slices x 8
    grid = mesh_lib.device_grid({"data": 4, "fsdp": 8, "dcn": {"data": 4}}, chips)
    assert grid.shape == (4, 8, 1)
    for row in range(4):  # each data index is one slice: fsdp collectives never leave it
        assert {d.slice_index for d in grid[row].ravel()} == {row}
    grid = mesh_lib.device_grid({"data": 4, "fsdp": 8, "dcn": {"data": 2, "fsdp": 2}}, chips)
    slices = np.vectorize(lambda d: d.slice_index)(grid)[:, :, 0]
    assert (slices[:2, :4] == slices[0, 0]).all() and len(np.unique(slices)) == 4  # 2x4 blocks per slice

    gpus = [Gpu(i, process_index=i // 8) for i in range(16)]  # 2 nodes x 8 GPUs: processes are granules
    grid = mesh_lib.device_grid({"data": 2, "fsdp": 8, "dcn": {"data": 2}}, gpus)
    assert [{d.process_index for d in grid[r].ravel()} for r in range(2)] == [{0}, {1}]

    with pytest.raises(ValueError, match="spans 2 slices, but the devices are on 4"):
        mesh_lib.device_grid({"data": 4, "fsdp": 8, "dcn": {"data": 2}}, chips)
    with pytest.raises(ValueError, match=r"axes \['data'\] do not split"):
        mesh_lib.device_grid({"data": 2, "fsdp": 16, "dcn": {"data": 4}}, chips)
    with pytest.raises(ValueError, match="does not have"):
        mesh_lib.device_grid({"data": 32, "dcn": {"pipeline": 4}}, chips)
    assert dict(mesh_lib.make_mesh({"data": -1, "dcn": {"data": 1}}).shape)["data"] == 8  # one granule: plain mesh


def test_logical_rules_split_what_divides_and_replicate_the_rest():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    assert mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (64, 9, 16), mesh) == P("fsdp", None, None)
    assert mesh_lib.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert mesh_lib.logical_to_spec(("batch", "length"), (2, 5), mesh) == P("data", None)


def test_forward_sharded_2x2x2_equals_single_device():
    expected = np.asarray(forward(tiny_model(seed=0), TOKENS))
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = mesh_lib.shard_model(tiny_model(seed=0), mesh)
    assert model.layers.wq[...].sharding.spec == P(None, "fsdp", "tensor", None)
    batch = jax.device_put(TOKENS, mesh_lib.batch_sharding(mesh))
    np.testing.assert_allclose(np.asarray(forward(model, batch)), expected, atol=1e-5)


def test_smollm2_loaded_into_a_mesh_matches_single_device(smollm2):
    model, tok = smollm2
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load("smollm2-135m-instruct", mesh=mesh)
    assert len(sharded.layers.w_up[...].sharding.device_set) == 8
    texts = ["The three primary colours are", "One, two, three,", "Paris is the capital of", "Water boils at"]
    prompts = [tok.encode(t) for t in texts]  # 4 rows: the batch splits over data x fsdp
    ids = jnp.asarray([p[:3] for p in prompts])
    expected = np.asarray(forward(model, ids))
    got = forward(sharded, jax.device_put(ids, mesh_lib.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4 * np.abs(expected).max())
    a = sampling.generate(model, prompts, max_new_tokens=8)
    b = sampling.generate(sharded, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_agree_with_one(tmp_path):
    expected = np.asarray(forward(tiny_model(seed=0), TOKENS))
    port = _free_port()
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests_dir), "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen([sys.executable, str(tests_dir / "distributed_worker.py"), str(port), str(i),
                          str(tmp_path / f"out{i}.npy")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output.decode()[-3000:]
    out0, out1 = np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy")
    np.testing.assert_array_equal(out0, out1)
    np.testing.assert_allclose(out0, expected, atol=1e-5)
    # each process sampled its own rows, exactly as one process samples the whole batch
    from helpers import SAMPLING_PROMPTS, SAMPLING_SETTINGS

    alone = sampling.generate(tiny_model(seed=0), SAMPLING_PROMPTS, **SAMPLING_SETTINGS)
    assert alone.lengths.min() < 8 < alone.lengths.max()  # some rows left early
    together = np.concatenate([np.load(tmp_path / f"out{i}_tokens.npy") for i in range(2)])
    np.testing.assert_array_equal(together, alone.tokens)


def test_local_rows_cover_the_batch_in_order_on_one_process():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh_lib.local_rows(mesh, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    x = mesh_lib.host_to_global(np.arange(16).reshape(8, 2), mesh)
    np.testing.assert_array_equal(mesh_lib.global_to_local(x, mesh), np.arange(16).reshape(8, 2))
