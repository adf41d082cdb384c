"""Ahead-of-time compiles for accelerators that are not attached: does a job fit before it is booked?

JAX compiles for a TPU topology (through libtpu) or for NVIDIA GPUs (through the CUDA plugin)
on a CPU-only host, from abstract arrays (`jax.ShapeDtypeStruct` with shardings) instead of
weights. The compiled program's memory analysis is the per-device truth: arguments, outputs,
temporaries and generated code, which no estimate replaces.

Targets: a TPU topology name that libtpu knows (`v5e:2x2`, `v6e:4x4`, `v5p:4x4x2`, `v4-8`) or
`h100:N` / `h200:N` (N GPUs on one node), described by the XLA GPU target configs in
`jaxdistill/gpu_targets/`. Each system says which programs its job runs (`programs(config,
devices)` in its `compile` module); `compile_all` compiles them one by one with a progress
line each and returns their reports.

TPU `cost_analysis()` counts a while loop's body once (the same FLOPs for 1 or 36 scanned
layers) and GPU's returns None, so FLOPs are never taken from here: see docs/scale.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxdistill.errors import ConfigError, UserError

GIB = 2**30
HEADROOM = 0.10  # a preset must leave this share of device memory free
GPU_TARGETS = Path(__file__).with_name("gpu_targets")

# Device memory by device kind: what one chip or GPU offers its program.
DEVICE_MEMORY = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * 10**9,  # v5p: 95 GB of HBM2e
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    # GPUs: what CUDA reports usable (gpu_targets/*.txtpb). JAX preallocates 75% of it unless
    # XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise; launch/slurm_gpu.sh sets 0.95.
    "h100": 84_978_434_048,  # H100 SXM 80 GB
    "h200": 150_754_820_096,  # H200 SXM 141 GB
}


class DoesNotFit(UserError):
    """A compiled program needs more memory per device than the target has (less the headroom)."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda"
    devices: tuple
    device_memory: int  # bytes per device

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


def target(name: str) -> Target:
    """The compile-only devices of a target name (see the module docstring)."""
    from jax.experimental import topologies

    gpu = re.fullmatch(r"(h100|h200):(\d+)", name)
    if gpu:
        kind, count = gpu.group(1), int(gpu.group(2))
        description = (GPU_TARGETS / f"{kind}.txtpb").read_text()
        try:
            topology = topologies.get_topology_desc(kind, "cuda", target_config=description,
                                                    topology=f"1x1x{count}")
        except Exception as err:  # the CUDA plugin is missing or cannot compile here
            raise ConfigError(f"target {name}: JAX cannot compile for NVIDIA GPUs on this host ({err}). Install "
                              "the CUDA build (`bash scripts/setup.sh --accelerator gpu`).") from None
        return Target(name, "cuda", tuple(topology.devices), DEVICE_MEMORY[kind])
    try:
        import libtpu  # noqa: F401  (its absence is the usual reason a TPU topology is unknown)
    except ImportError:
        raise ConfigError(f"target {name}: compiling for TPUs needs libtpu: `pip install 'jax[tpu]'` in this venv "
                          "(the test extras have it).") from None
    # Compile-only: several processes (a test run beside a compile) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    options = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    try:
        topology = topologies.get_topology_desc(name, "tpu", **options)
    except Exception as err:
        raise ConfigError(f"target {name!r} is not a TPU topology libtpu knows ({str(err).splitlines()[0]}); "
                          "use e.g. v5e:2x2, v6e:4x4, v5p:4x4x2, v4-8, or h100:8 / h200:8.") from None
    kind = topology.devices[0].device_kind
    if kind not in DEVICE_MEMORY:
        raise ConfigError(f"target {name}: no device memory recorded for {kind!r} (jaxdistill/aot.py DEVICE_MEMORY).")
    return Target(name, "tpu", tuple(topology.devices), DEVICE_MEMORY[kind])


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program of a job and the abstract arguments it is called with."""

    name: str
    function: Callable  # a jax.jit-wrapped function
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Report:
    program: str
    target: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments' buffers
    temp_bytes: int
    code_bytes: int
    device_memory: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Live bytes per device while the program runs: its arguments, the outputs that do not
        reuse them, its temporaries and its code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def headroom(self) -> float:
        return 1 - self.peak_bytes / self.device_memory

    @property
    def fits(self) -> bool:
        return self.headroom >= HEADROOM

    def line(self) -> str:
        gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        return (f"{self.program:<16} args {gib(self.argument_bytes)}  out {gib(self.output_bytes - self.alias_bytes)}"
                f"  temp {gib(self.temp_bytes)}  code {gib(self.code_bytes)}  = {gib(self.peak_bytes)} of "
                f"{gib(self.device_memory)} GiB per device ({self.headroom:.0%} free, "
                f"{'fits' if self.fits else 'DOES NOT FIT'}; compiled in {self.compile_seconds:.0f}s)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes, "headroom": self.headroom,
                                           "fits": self.fits}


def compile_program(program: Program, target_: Target) -> tuple[Report, jax.stages.Compiled]:
    start = time.perf_counter()
    compiled = program.function.lower(*program.args, **program.kwargs).compile()
    stats = compiled.memory_analysis()
    report = Report(program.name, target_.name, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                    int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
                    int(stats.generated_code_size_in_bytes), target_.device_memory, time.perf_counter() - start)
    return report, compiled


def compile_all(programs: Iterator[Program], target_: Target, *, out: Path | None = None) -> list[Report]:
    """Compile the programs a generator yields, one by one with a progress line each; the
    generator receives each compiled program back (`compiled = yield program`), so a later
    program can take an earlier one's outputs. Writes `out` (compile.json) if given. Raises
    DoesNotFit, naming the largest program over the limit, once every program has compiled."""
    reports, compiled = [], None
    print(f"compiling for {target_.name} ({len(target_.devices)} x {target_.device_kind}, "
          f"{target_.device_memory / GIB:.1f} GiB each, {HEADROOM:.0%} headroom required)", flush=True)
    while True:
        try:
            program = programs.send(compiled) if reports else next(programs)
        except StopIteration:
            break
        print(f"  {program.name}: compiling ...", flush=True)
        report, compiled = compile_program(program, target_)
        reports.append(report)
        print("  " + report.line(), flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"target": target_.name, "devices": len(target_.devices),
                                   "device_kind": target_.device_kind,
                                   "programs": [r.as_dict() for r in reports]}, indent=1))
    over = [r for r in reports if not r.fits]
    if over:
        worst = max(over, key=lambda r: r.peak_bytes)
        raise DoesNotFit(f"{worst.program} needs {worst.peak_bytes / GIB:.2f} GiB per device on {target_.name}; "
                         f"with {HEADROOM:.0%} headroom a {target_.device_kind} offers "
                         f"{(1 - HEADROOM) * target_.device_memory / GIB:.2f} GiB. Shard more (mesh.fsdp), "
                         "remat, shrink the batch or the lengths, or pick a larger target.")
    return reports


def abstract(shape: Sequence[int], dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), np.dtype(dtype), sharding=sharding)


def outputs_of(program: Program, compiled: jax.stages.Compiled):
    """A compiled program's outputs as abstract arrays in the shardings the compiler gave them:
    the arguments of a program that takes them (a decode loop after its prefill)."""
    shapes = jax.eval_shape(program.function, *program.args, **program.kwargs)  # the jit keeps its static args
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes,
                        compiled.output_shardings)  # not `abstract`: the state may hold PRNG keys
