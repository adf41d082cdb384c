"""A model out of jaxdistill: a Hugging Face directory that transformers, vLLM and lm-eval load.

    python -m jaxdistill export SOURCE OUT_DIR [--dtype=bfloat16] [--adapter]

SOURCE is anything `models.load` takes (a built-in name, a GGUF file, an HF directory, the work
directory of a finished training run). OUT_DIR gets config.json, generation_config.json, the
tokenizer files with the chat template, and safetensors (sharded with an index above
`max_shard_bytes`). A LoRA run exports with its adapters merged into the weights, or with
`--adapter` as a PEFT adapter directory that `peft.PeftModel.from_pretrained(base, OUT_DIR)` loads.

The weights stream: one tensor (one layer's slice of a stacked parameter) is gathered to the
host, converted to the file layout (the inverse of `streaming.Layout.read`) and written before
the next, so the host holds the model's own parameters plus one tensor. On several processes
every process takes part in each gather and process 0 writes. OUT_DIR may be local or on an
object store (`gs://...`, any URL tensorstore opens, as for loading); a remote file is written
whole, so there the host also holds one file (one shard) at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxdistill import runs
from jaxdistill.models.config import ConfigError, ModelConfig, hf_tensor_names
from jaxdistill.models.streaming import LAYOUTS, SAME, _store, is_url

EXPORT_DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16"),
                 "float16": (np.float16, "F16")}
MAX_SHARD_BYTES = 5 * 2**30


def hf_model_type(config: ModelConfig) -> str:
    """The transformers model_type whose modelling code matches `config`."""
    if config.arch == "gemma3":
        return "gemma3_text"
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if all(config.layer_is_local) else "llama"


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _rope_scaling(config: ModelConfig) -> dict | None:
    s = config.rope_scaling
    if s.kind == "default":
        return None
    out = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    if s.kind == "yarn":
        out |= {"beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
                "original_max_position_embeddings": s.original_max_position}
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


def hf_config(config: ModelConfig, *, dtype: str, tokenizer=None) -> dict:
    """config.json for `config` (the inverse of `ModelConfig.from_hf`, in the rope_theta /
    rope_scaling spelling that transformers v4 and v5 and vLLM all read)."""
    model_type = hf_model_type(config)
    out = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta, "rope_scaling": _rope_scaling(config), "torch_dtype": dtype,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if tokenizer is not None:
        hf = tokenizer.hf
        out |= {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": tokenizer.pad_id}
    if model_type == "gemma3_text":
        scalar = round(config.attention_scale**-2, 6)
        out |= {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": int(scalar) if scalar.is_integer()
                else scalar,
                "sliding_window": config.sliding_window, "rope_local_base_freq": config.local_rope_theta,
                "layer_types": ["sliding_attention" if local else "full_attention" for local in config.layer_is_local]}
        return out
    if any(config.layer_is_local) and not all(config.layer_is_local):
        raise ConfigError(f"a {model_type} model with some local layers has no Hugging Face config; "
                          "only Gemma 3 mixes local and global layers.")
    local = all(config.layer_is_local)
    out |= {"hidden_act": "silu", "sliding_window": config.sliding_window if local else None}
    if model_type in ("qwen2", "qwen3"):
        out |= {"use_sliding_window": local, "max_window_layers": 0 if local else config.num_layers}
    if model_type == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    return out


@jax.jit
def _layer(stacked: jax.Array, index) -> jax.Array:
    """One layer's slice of a stacked parameter, on its devices (one program for every index)."""
    return jax.lax.dynamic_index_in_dim(stacked, index, keepdims=False)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(model, dtype) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(name, file shape, read) for every tensor of the Hugging Face checkpoint of `model`, in
    file order; `read()` gathers that one tensor and returns it in the file's layout and `dtype`."""
    config: ModelConfig = model.config
    names = hf_tensor_names(config)
    gemma_norm = config.arch == "gemma3"  # Gemma's norms scale by (1 + w); ours by the stored value
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path not in names:
            raise ConfigError(f"parameter {'.'.join(map(str, path))} has no place in a Hugging Face checkpoint "
                              f"of a {config.arch} model.")
        value, name = variable.get_value(), names[path]
        layout = LAYOUTS.get(path[-1], SAME)
        shift = 1.0 if gemma_norm and path[-1].endswith("norm") else 0.0
        per_layer = value.shape[1:] if isinstance(name, list) else value.shape

        def read(value=value, index=None, layout=layout, shift=shift):
            ours = _to_host(value if index is None else _layer(value, index)).astype(np.float32)
            return layout.to_file(ours - shift if shift else ours).astype(dtype)

        file_shape = layout.to_file(np.empty(per_layer, np.bool_)).shape
        if isinstance(name, list):
            for i, layer_name in enumerate(name):
                yield layer_name, file_shape, lambda i=i, read=read: read(index=i)
        else:
            yield name, file_shape, read


def _shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped into files of at most `max_bytes` (a bigger tensor alone)."""
    groups, size = [[]], 0
    for i, (_, shape) in enumerate(entries):
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups


def _header(entries, itemsize: int, file_dtype: str) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": file_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(data)) + data


class _Destination:
    """Files into a local directory (each written to a temporary name, then renamed) or onto a
    store (each written whole). Only process 0 writes."""

    def __init__(self, out_dir: str):
        self.url = out_dir.rstrip("/") + "/" if is_url(out_dir) else None
        self.local = None if self.url else Path(out_dir).expanduser()
        self.writes = runs.is_writer()
        if self.local is not None and self.writes:
            if self.local.exists() and any(self.local.iterdir()):
                raise FileExistsError(f"{self.local} exists and is not empty; export into a new directory.")
            self.local.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, chunks) -> None:
        if self.local is None:
            data = b"".join(chunks)
            if self.writes:
                _store(self.url).write(name, data).result()
            return
        if not self.writes:
            for _ in chunks:  # every process takes part in every gather
                pass
            return
        tmp = self.local / f".{name}.tmp"
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, self.local / name)


def save_hf(model, tokenizer, out_dir: str | Path, *, dtype: str = "float32",
            max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `model` and `tokenizer` as a Hugging Face model directory; returns the files written.
    Without a tokenizer only the weights and config.json are written."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not supported; use one of {sorted(EXPORT_DTYPES)}.")
    np_dtype, file_dtype = EXPORT_DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    destination = _Destination(str(out_dir))
    tensors = list(hf_tensors(model, np_dtype))
    entries = [(name, shape) for name, shape, _ in tensors]
    groups = _shards(entries, itemsize, max_shard_bytes)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for file, group in zip(files, groups, strict=True):
        header = _header([entries[i] for i in group], itemsize, file_dtype)
        chunks = itertools.chain([header], (np.ascontiguousarray(tensors[i][2]()).tobytes() for i in group))
        destination.write(file, chunks)  # a generator: one tensor on the host at a time
    if len(groups) > 1:
        weight_map = {entries[i][0]: file for file, group in zip(files, groups, strict=True) for i in group}
        total = sum(math.prod(shape) * itemsize for _, shape in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        destination.write("model.safetensors.index.json", [json.dumps(index, indent=2).encode()])
    small = {"config.json": hf_config(model.config, dtype=dtype, tokenizer=tokenizer)}
    if tokenizer is not None:
        small["generation_config.json"] = {"bos_token_id": tokenizer.hf.bos_token_id,
                                           "eos_token_id": list(tokenizer.eos_ids), "pad_token_id": tokenizer.pad_id}
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer files, with the chat template
            tokenizer.hf.save_pretrained(tmp)
            for file in sorted(Path(tmp).iterdir()):
                destination.write(file.name, [file.read_bytes()])
                files.append(file.name)
    for name, content in small.items():
        destination.write(name, [json.dumps(content, indent=2).encode()])
    return files + list(small)


def save_peft(model, out_dir: str | Path, *, base: str, dtype: str = "float32") -> list[str]:
    """Write `model`'s LoRA adapters as a PEFT adapter directory (adapter_config.json,
    adapter_model.safetensors) on the base model `base`; returns the files written."""
    from jaxdistill.models import lora as lora_lib

    if getattr(model, "lora", None) is None:
        raise ConfigError("this model has no LoRA adapters: --adapter exports a LoRA run's adapters (a run trained "
                          "with --config.lora.rank > 0); export without it for the whole model.")
    np_dtype, file_dtype = EXPORT_DTYPES[dtype]
    tensors = lora_lib.peft_tensors(model)
    entries = [(name, t.shape) for name, t in tensors.items()]
    destination = _Destination(str(out_dir))
    destination.write("adapter_model.safetensors", itertools.chain(
        [_header(entries, np.dtype(np_dtype).itemsize, file_dtype)],
        (np.ascontiguousarray(t.astype(np_dtype)).tobytes() for t in tensors.values())))
    config = lora_lib.peft_config(model.lora, base)
    destination.write("adapter_config.json", [json.dumps(config, indent=2).encode()])
    return ["adapter_model.safetensors", "adapter_config.json"]


def export(source: str, out_dir: str, *, dtype: str | None = None, adapter: bool = False) -> list[str]:
    """`python -m jaxdistill export`: load SOURCE, write it to OUT_DIR, print what was written.
    A LoRA run exports with its adapters merged into the weights, or with `adapter` as a PEFT
    adapter directory on its base model."""
    from jaxdistill.models.loading import load, training_run
    from jaxdistill.models.lora import merge_adapters

    run = training_run(source)
    model_dtype = run["dtype"] if run else "float32"
    model, tokenizer = load(source, dtype=model_dtype)
    if adapter:
        files = save_peft(model, out_dir, base=run["model"] if run else str(source), dtype=dtype or model_dtype)
        print(f"exported the LoRA adapters of {source} (rank {model.lora.rank}, on {run['model']}) to {out_dir}: "
              f"{', '.join(files)}")
        return files
    merge_adapters(model)
    files = save_hf(model, tokenizer, out_dir, dtype=dtype or model_dtype)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"exported {source} ({params / 1e6:.1f}M parameters, {dtype or model_dtype}) to {out_dir}: "
          f"{', '.join(files)}")
    return files
