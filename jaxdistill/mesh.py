"""Meshes, logical axis rules and shardings: the one place every system gets them from.

A mesh has the axes `data`, `fsdp`, `tensor` and any extra named axes (the aggregator
adds `teacher`). Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...);
`LOGICAL_RULES` maps each to mesh axes. A dimension that does not divide evenly over
its mesh axes stays replicated along them (SmolLM2's 9 heads on a tensor axis of 2).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

BASE_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (in order); None: replicated.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "lora_rank": None,
    "norm": None,
    "length": None,
    "teacher": ("teacher",),
}


def fake_cpu_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices; call before JAX first touches a backend."""
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    if jax._src.xla_bridge.backends_are_initialized() and jax.device_count("cpu") < count:
        raise RuntimeError(
            f"JAX already started with {jax.device_count('cpu')} CPU devices; call fake_cpu_devices({count}) "
            "before any JAX computation (or set XLA_FLAGS before starting Python)."
        )


def initialize_distributed(coordinator_address: str | None = None, num_processes: int = 1, process_id: int = 0,
                           local_device_ids: Sequence[int] | str | None = None) -> None:
    """Start jax.distributed for multi-process runs; a no-op for a single process.

    On TPU pods and SLURM clusters JAX finds the values itself: pass no coordinator and
    set num_processes to -1. `local_device_ids` ("0,1,2,3" or a list; empty: JAX's choice)
    are the accelerators this process drives; launch/slurm_gpu.sh passes all of a node's GPUs.
    """
    if num_processes == 1:
        return
    if isinstance(local_device_ids, str):
        local_device_ids = [int(i) for i in local_device_ids.split(",") if i.strip()] or None
    coordinator_address = coordinator_address or None
    # Cross-process collectives on CPU (tests, CPU clusters); ignored by GPU and TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes == -1:
        jax.distributed.initialize(local_device_ids=local_device_ids)
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from axis sizes, e.g. {"data": 2, "fsdp": 2, "tensor": 2}.

    Missing base axes get size 1; one axis may be -1 to take the remaining devices. A "dcn"
    entry, e.g. {"data": 4, "fsdp": 64, "dcn": {"data": 4}}, says how many ways each axis
    spans the slow network: TPU slices (multi-slice), or processes where devices have no
    slice (GPU nodes). Each slice then holds a whole block of the other axes, so only the
    dcn axes' collectives (data-parallel gradient sums) cross it.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(shape, devices), tuple(_sizes(shape, len(devices))))


def _sizes(shape: Mapping[str, int], device_count: int) -> dict[str, int]:
    sizes = {axis: 1 for axis in BASE_AXES} | {k: int(v) for k, v in dict(shape).items() if k != "dcn"}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % known:
            raise ValueError(f"{device_count} devices do not divide over the fixed mesh axes {sizes}.")
        sizes[free[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {device_count} are available; "
            "change the sizes or set one axis to -1."
        )
    return sizes


def device_grid(shape: Mapping[str, int], devices: Sequence) -> np.ndarray:
    """The devices laid out as the mesh `shape` (see `make_mesh`), topology-aware where JAX
    knows the topology (GPUs, TPUs), in their order otherwise."""
    from jax.experimental import mesh_utils

    sizes = _sizes(shape, len(devices))
    dcn = dict(shape.get("dcn") or {})
    unknown = set(dcn) - set(sizes)
    if unknown:
        raise ValueError(f"mesh.dcn names axes {sorted(unknown)} that the mesh {sizes} does not have.")
    dcn = [int(dcn.get(axis, 1)) for axis in sizes]
    if math.prod(dcn) > 1:
        by_slice = hasattr(devices[0], "slice_index")
        granules = len({d.slice_index if by_slice else d.process_index for d in devices})
        if math.prod(dcn) != granules:
            raise ValueError(f"mesh.dcn {dict(zip(sizes, dcn, strict=True))} spans {math.prod(dcn)} "
                             f"{'slices' if by_slice else 'processes'}, but the devices are on {granules}.")
        bad = [axis for axis, d in zip(sizes, dcn, strict=True) if sizes[axis] % d]
        if bad:
            raise ValueError(f"mesh axes {bad} do not split {dict(zip(sizes, dcn, strict=True))} ways over the "
                             f"slow network; each must be a multiple of its dcn ways.")
        ici = [size // d for size, d in zip(sizes.values(), dcn, strict=True)]
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice,
                                                    allow_split_physical_axes=True)
    try:  # on GPUs and TPUs: neighbours along the inner (tensor) axes share the fastest links
        return mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as err:
        log.info("no topology-aware layout for mesh %s (%s); devices in order", sizes, err)
        return np.asarray(devices).reshape(tuple(sizes.values()))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...] | None] = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes, skipping splits that do not divide."""
    spec, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = rules.get(name) if name else None
        chosen = []
        for axis in mesh_axes or ():
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                log.info("logical axis %s (size %d) does not divide over mesh axis %s; replicated", name, dim, axis)
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def param_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1) or None
    return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def put_global(host: np.ndarray, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A host array (the same on every process) -> a global array with this sharding.

    Each process copies only its own shards, so this works across hosts too.
    """
    host = np.asarray(host, dtype=dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model, mesh: Mesh, variables=...):
    """Move an NNX model's parameters (those `variables` filters, default all) into their mesh
    shardings (in place); returns the model. Abstract parameters (`nnx.eval_shape`) become
    ShapeDtypeStructs carrying their sharding, which is what an ahead-of-time compile takes
    instead of weights."""
    from flax import nnx

    def put(variable):
        value = variable.get_value()
        axes = variable.get_metadata().get("axes") or (None,) * value.ndim
        sharding = param_sharding(mesh, axes, value.shape)
        if isinstance(value, jax.ShapeDtypeStruct):
            return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
        return variable.replace(put_global(np.asarray(value), sharding))

    state = jax.tree.map(put, nnx.state(model, variables), is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, state)
    return model


def mesh_of(tree) -> Mesh | None:
    """The mesh the (possibly abstract) arrays of `tree` are placed on, or None if none is."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def optimizer_shardings(tx, params):
    """The shardings of `tx.init(params)`: every moment (any copy of the parameter tree inside
    the optimizer state) in its parameter's sharding, counters replicated. None off a mesh.

    The moments do not depend on the parameters' values, so `jax.jit(tx.init)` alone returns
    them off the mesh (whole on one device, then replicated): jit it with these out_shardings.
    `params` may be abstract (ShapeDtypeStructs with shardings), for ahead-of-time compiles."""
    import optax

    mesh = mesh_of(params)
    if mesh is None:
        return None
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, param: param.sharding, jax.eval_shape(tx.init, params), params,
                                 transform_non_params=lambda _: replicated)


def batch_rows_per_process(mesh: Mesh) -> int:
    """How many ways this process's rows split over its devices: a process's row count must be a
    multiple of this. The batch axes (data x fsdp) must span every process."""
    ways = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))
    if ways % jax.process_count():
        raise ValueError(f"the batch axes (data x fsdp = {ways}) must be a multiple of the {jax.process_count()} "
                         "processes, so that each process feeds its own rows; change the mesh.")
    return ways // jax.process_count()


def process_max(values: Sequence[int]) -> list[int]:
    """Elementwise maximum of a few integers over all processes (the same answer on each)."""
    if jax.process_count() == 1:
        return [int(v) for v in values]
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(np.asarray(values, np.int32)).max(axis=0).tolist()


def process_concat(values: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-row array, in process order (the global batch's order)."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values), tiled=True))


def local_rows(mesh: Mesh, rows: int) -> list[tuple[int, int]]:
    """The [start, stop) blocks of a global batch of `rows` rows that this process's devices hold
    under the batch sharding, in order: where `host_to_global` puts this process's rows."""
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((rows,))
    return sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop) for s in index.values()})


def global_to_local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """A global array over the batch -> this process's rows, where `host_to_global` put them."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.concatenate([full[start:stop] for start, stop in local_rows(mesh, full.shape[0])])


def host_to_global(batch, mesh: Mesh):
    """Per-process host arrays (this process's rows) -> global arrays split over the batch axes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, batch)
