"""Streaming, sharded loading of Hugging Face safetensors checkpoints.

`load_hf_streaming` builds a Decoder straight from the files: every parameter is created
with `jax.make_array_from_callback`, so each process materialises only the slices its own
devices hold, and each slice is read from disk in the file's dtype, a block of rows at a
time (plain reads at computed offsets, no whole-file map). Peak host memory is the
parameters this process holds plus one parameter's local slice in flight, instead of
every tensor in float32 plus its stacked copy (`loading.read_hf_directory`, kept as the
reference the tests compare against).

Our layout differs from Hugging Face's by a transpose and by splitting one axis into
(heads, head_dim); `Layout` maps a slice of ours back to the block of the file to read.

A directory on an object store (`gs://bucket/model/`, or any URL tensorstore's kvstore
opens) is mirrored locally without its weights (`mirror_remote`: config, tokenizer and
index files) and its safetensors are read from the store in byte ranges, slice by slice,
like local files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxdistill.models.config import ConfigError, ModelConfig, hf_tensor_names

FILE_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


REMOTE_MARKER = "jaxdistill-remote.txt"  # in a local mirror: the URL its weights stream from


def is_url(name: str) -> bool:
    return "://" in str(name)


def mirror_remote(url: str) -> Path:
    """A local directory with every top-level file of the remote model directory `url` except
    its safetensors, which stay on the store (their URL is written to REMOTE_MARKER)."""
    from jaxdistill.models.tokenizer import cache_dir

    url = url.rstrip("/") + "/"
    try:
        store = _store(url)
        keys = [k.decode() for k in store.list().result()]
    except Exception as e:  # tensorstore raises ValueError/RuntimeError with the store's message
        raise FileNotFoundError(f"cannot list the model directory {url}: {e}") from None
    if "config.json" not in keys:
        raise FileNotFoundError(f"{url} has no config.json: pass a Hugging Face model directory.")
    local = cache_dir() / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for key in keys:
        if "/" not in key and not key.endswith(".safetensors"):
            data = store.read(key).result().value
            tmp = local / f".{key}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, local / key)  # atomic: a concurrent reader never sees half a file
    (local / REMOTE_MARKER).write_text(url)
    return local


@dataclasses.dataclass(frozen=True)
class Source:
    """A safetensors file: on this machine (`url` None) or on a store tensorstore opens."""

    path: Path
    url: str | None = None

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer only past the end of a local file)."""
        if self.url is None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        return _store(self.url).read(self.path.name, byte_range=slice(offset, offset + length)).result().value

    def holds(self, end: int) -> bool:
        """Whether the file is at least `end` bytes long."""
        if self.url is None:
            return self.path.stat().st_size >= end
        try:
            return len(self.read(end - 1, 1)) == 1
        except ValueError:  # tensorstore: OUT_OF_RANGE
            return False

    def __str__(self) -> str:
        return str(self.path) if self.url is None else self.url + self.path.name


@functools.lru_cache(maxsize=8)
def _store(url: str):
    import tensorstore as ts

    return ts.KvStore.open(url).result()


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Source
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file


def read_header(file: Path | Source) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file: name -> where its bytes are (no data is read)."""
    file = file if isinstance(file, Source) else Source(Path(file))
    size_bytes = file.read(0, 8)
    if len(size_bytes) < 8:
        raise ValueError(f"{file} is not a safetensors file (shorter than its 8-byte header size).")
    (size,) = struct.unpack("<Q", size_bytes)
    try:
        header = json.loads(file.read(8, size))
    except ValueError as e:
        raise ValueError(f"{file}: unreadable safetensors header ({e}); the file is damaged.") from None
    entries = {}
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    truncated = bool(ends) and not file.holds(8 + size + max(ends))
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in FILE_DTYPES:
            raise ConfigError(f"{file}: tensor {name} has dtype {info['dtype']}; supported: {sorted(FILE_DTYPES)}.")
        start, end = info["data_offsets"]
        dtype, shape = np.dtype(FILE_DTYPES[info["dtype"]]), tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize or (truncated and not file.holds(8 + size + end)):
            raise ValueError(f"{file}: tensor {name} is truncated; the file is damaged, re-download it.")
        entries[name] = TensorEntry(file, dtype, shape, 8 + size + start)
    return entries


def read_rows(entry: TensorEntry, rows: slice) -> np.ndarray:
    """Rows [start, stop) of a tensor's leading axis (the whole tensor for a scalar), read from disk."""
    row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    count = rows.stop - rows.start
    data = entry.file.read(entry.offset + rows.start * row, count * row)
    return np.frombuffer(data, entry.dtype).reshape(count, *entry.shape[1:])


@dataclasses.dataclass(frozen=True)
class Layout:
    """Ours = transpose(theirs, perm).reshape(ours): after the transpose, axis j of theirs
    splits into our axes groups[j] (one axis, or (heads, head_dim))."""

    perm: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    def file_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        transposed = [math.prod(ours[a] for a in group) for group in self.groups]
        shape = [0] * len(transposed)
        for j, axis in enumerate(self.perm):
            shape[axis] = transposed[j]
        return tuple(shape)

    def read(self, entry: TensorEntry, ours: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """Our-layout block `index` (slices of our shape `ours`) of the tensor in `entry`."""
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, ours, strict=True))
        covering, inner, local = [], [], []
        for group in self.groups:
            head, rest = group[0], group[1:]
            per = math.prod(ours[a] for a in rest)  # elements of the split-off axes per step of the first
            covering.append(slice(index[head].start * per, index[head].stop * per))
            local.append(index[head].stop - index[head].start)
            for a in rest:
                local.append(ours[a])
            inner += [slice(None)] + [index[a] for a in rest]
        ranges = [None] * len(self.perm)
        for j, axis in enumerate(self.perm):
            ranges[axis] = covering[j]
        block = read_rows(entry, ranges[0])[(slice(None), *ranges[1:])]
        return block.transpose(self.perm).reshape(local)[tuple(inner)]

    def to_file(self, ours: np.ndarray) -> np.ndarray:
        """A whole tensor in our layout -> the file's layout (the inverse of `read`)."""
        transposed = ours.reshape([math.prod(ours.shape[a] for a in group) for group in self.groups])
        return transposed.transpose(np.argsort(self.perm))


SAME, T = Layout((0,), ((0,),)), Layout((1, 0), ((0,), (1,)))
LAYOUTS = {  # parameters that are not vectors stored as they are
    "wq": Layout((1, 0), ((0,), (1, 2))), "wk": Layout((1, 0), ((0,), (1, 2))), "wv": Layout((1, 0), ((0,), (1, 2))),
    "wo": Layout((1, 0), ((0, 1), (2,))), "bq": Layout((0,), ((0, 1),)), "bk": Layout((0,), ((0, 1),)),
    "bv": Layout((0,), ((0, 1),)), "w_gate": T, "w_up": T, "w_down": T, "lm_head": T,
    "embed": Layout((0, 1), ((0,), (1,))),
}


def _tensor_index(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a model directory by canonical name (the multimodal prefix removed);
    a mirror's (see `mirror_remote`) are on its store."""
    marker = path / REMOTE_MARKER
    url = marker.read_text() if marker.exists() else None
    present = set(_store(url).list().result()) if url else None

    def exists(name: str) -> bool:
        return (path / name).exists() if url is None else name.encode() in present

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif exists("model.safetensors"):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{url or path} has neither model.safetensors nor model.safetensors.index.json.")
    entries = {}
    for file in files:
        if not exists(file):
            raise FileNotFoundError(f"{url or path}{'' if url else '/'}{file} is listed in the index but missing; "
                                    "re-download the model.")
        for key, entry in read_header(Source(path / file, url)).items():
            entries[re.sub(r"^(model\.)?language_model\.(model\.)?", "model.", key)] = entry
    return entries


def load_hf_streaming(path: Path, config: ModelConfig, *, dtype=np.float32, compute_dtype=None, mesh=None,
                      remat: bool | str = False, attention: str = "xla"):
    """A Decoder whose parameters are read from the directory's safetensors slice by slice,
    straight into their shardings on `mesh` (or onto the default device)."""
    from jaxdistill import mesh as mesh_lib
    from jaxdistill.models.transformer import Decoder

    entries = _tensor_index(path)
    sources = hf_tensor_names(config)
    used = {name for names in sources.values() for name in ([names] if isinstance(names, str) else names)}
    unused = sorted(set(entries) - used - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if config.tie_embeddings and "lm_head.weight" in entries:  # a copy of the embedding: check its ends, cheaply
        embed, head = entries["model.embed_tokens.weight"], entries["lm_head.weight"]
        ends = (slice(0, 8), slice(embed.shape[0] - 8, embed.shape[0]))
        if head.shape != embed.shape or any(not np.array_equal(read_rows(embed, r), read_rows(head, r)) for r in ends):
            unused.append("lm_head.weight")
    if unused:
        raise ConfigError(f"the weights hold tensors the config does not use (first: {unused[:5]}); "
                          "is the config right?")
    gemma_norm = 1.0 if config.arch == "gemma3" else 0.0  # Gemma's norms scale by (1 + w); ours by the stored value

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), param_dtype=dtype,
                                              compute_dtype=compute_dtype or dtype, remat=remat,
                                              attention=attention, mesh=mesh))
    graphdef, abstract_state = nnx.split(abstract)
    flat = []
    for state_path, variable in nnx.to_flat_state(abstract_state):
        shape = variable.get_value().shape
        names = sources[state_path]
        stacked = isinstance(names, list)
        per_layer = shape[1:] if stacked else shape
        layout = LAYOUTS[state_path[-1]] if state_path[-1] in LAYOUTS else SAME
        if len(per_layer) != sum(len(g) for g in layout.groups):
            raise ConfigError(f"no file layout known for parameter {'.'.join(state_path)} of shape {shape}.")
        for name in names if stacked else [names]:
            if name not in entries:
                raise ConfigError(f"the weights have no tensor {name!r} that the config requires.")
            if entries[name].shape != layout.file_shape(per_layer):
                raise ConfigError(f"weight {name} has shape {entries[name].shape} but the config implies "
                                  f"{layout.file_shape(per_layer)}; the config contradicts the weights.")
        shift = gemma_norm if state_path[-1].endswith("norm") else 0.0

        def block(index, names=names, stacked=stacked, layout=layout, per_layer=per_layer, shift=shift):
            def one(tensor, inner):
                piece = layout.read(entries[tensor], per_layer, inner)
                return (piece.astype(np.float32) + shift).astype(dtype) if shift else piece.astype(dtype)

            if not stacked:
                return one(names, index)
            layers = range(*index[0].indices(len(names)))
            return np.stack([one(names[i], index[1:]) for i in layers])

        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = mesh_lib.param_sharding(mesh, variable.get_metadata()["axes"], shape)
        flat.append((state_path, variable.replace(jax.make_array_from_callback(shape, sharding, block))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
