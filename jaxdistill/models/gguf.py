"""GGUF files (llama.cpp's format, in which the embedded default models ship): the config from
their metadata and the weights dequantised into the canonical form of `loading` (Hugging Face
names, [out, in] layout, float32), llama.cpp's Q/K row permutation and Gemma's norm offset undone."""

from __future__ import annotations

import dataclasses
import functools
import re
import struct
from pathlib import Path

import numpy as np

from jaxdistill.models.config import ConfigError, ModelConfig

# GGUF metadata value types -> struct formats, which numpy reads as dtypes too (8 is a string, 9 an array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LONG = 1024  # string arrays longer than this (the tokenizer's) are left out of Header.meta


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
    qtype: int  # a gguf.GGMLQuantizationType
    offset: int  # of its first byte, from the start of the file


class Header:
    """A GGUF file's metadata and tensor directory, read with struct from a memory map.

    The gguf package's reader builds a Python object per vocabulary entry (4 s for SmolLM2's
    49k tokens, 16 s for Gemma 3's 262k, on every load); here arrays of strings are stepped
    over (those longer than _LONG, which only the tokenizer needs, are None in `meta`) and numeric
    arrays are numpy views.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.buffer = np.memmap(path, dtype=np.uint8, mode="r")
            if bytes(self.buffer[:4]) != b"GGUF":
                raise ValueError("no GGUF magic number")
            self.pos = 8  # magic, version
            tensor_count, kv_count = self._unpack("<QQ")
            self.meta = {}
            for _ in range(kv_count):
                key = self._string()
                self.meta[key] = self._value(*self._unpack("<I"))
            infos = []
            for _ in range(tensor_count):
                name = self._string()
                (ndim,) = self._unpack("<I")
                dims = self._unpack(f"<{ndim}Q")
                qtype, offset = self._unpack("<IQ")
                infos.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))
            alignment = int(self.meta.get("general.alignment", 32))
            start = -(-self.pos // alignment) * alignment
            self.tensors = [TensorInfo(n, shape, q, start + o) for n, shape, q, o in infos]
        except (ValueError, struct.error, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable GGUF file ({e}); re-download or re-assemble it.") from None

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        self.pos += n
        return bytes(self.buffer[self.pos - n:self.pos]).decode()

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        kind, count = self._unpack("<IQ")
        if kind in _SCALARS:
            size = np.dtype(_SCALARS[kind]).itemsize * count
            self.pos += size
            return np.frombuffer(self.buffer, _SCALARS[kind], count, self.pos - size)
        if kind == _STRING and count > _LONG:  # vocabularies, merges: step over them
            for _ in range(count):
                (n,) = self._unpack("<Q")
                self.pos += n
            return None
        return [self._value(kind) for _ in range(count)]

    def data(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's stored bytes, as gguf.quants.dequantize takes them (rows of blocks)."""
        import gguf

        block, block_bytes = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.qtype)]
        row_bytes = tensor.shape[-1] // block * block_bytes
        rows = int(np.prod(tensor.shape[:-1]))
        if tensor.offset + rows * row_bytes > self.buffer.size:
            raise ValueError(f"{self.path}: tensor {tensor.name} is truncated; the file is damaged, re-download it.")
        return self.buffer[tensor.offset:tensor.offset + rows * row_bytes].reshape(*tensor.shape[:-1], row_bytes)


def header(path: Path) -> Header:
    """The parsed file, kept while it is unchanged (a training run reads it for the config, the
    weights and the tokenizer)."""
    stat = Path(path).stat()
    return _header(Path(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _header(path: Path, mtime_ns: int, size: int) -> Header:
    return Header(path)


def tokenizer_fields(path: Path):
    """Every metadata field as the gguf package gives it, vocabulary included (slow: only for
    building a tokenizer, which is then cached)."""
    import gguf

    return gguf.GGUFReader(path).fields


def read_config(parsed: Header) -> ModelConfig:
    """The model config of a parsed GGUF file, from its metadata and tensor shapes."""
    shapes = {t.name: t.shape for t in parsed.tensors}
    return ModelConfig.from_gguf(parsed.meta, shapes)


def read(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and canonical (HF-named, [out, in], float32) weights of a GGUF file."""
    import gguf

    parsed = header(path)
    config = read_config(parsed)
    weights = {}
    for tensor in parsed.tensors:
        array = gguf.quants.dequantize(parsed.data(tensor), gguf.GGMLQuantizationType(tensor.qtype))
        array = array.astype(np.float32).reshape(tensor.shape)
        name = _gguf_to_hf_name(tensor.name, config.arch)
        if config.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            array = _unpermute_rope_rows(array, heads)
        if config.arch == "gemma3" and name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma's (1 + w); HF stores w
        weights[name] = array
    return config, weights


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_to_hf_name(name: str, arch: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m:
        raise ConfigError(f"unexpected GGUF tensor {name!r}")
    layer, part, kind = m.groups()
    if part == "ffn_norm":  # the pre-MLP norm: Llama calls it post_attention_layernorm
        hf_part = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    elif part in _GGUF_LAYER_NAMES:
        hf_part = _GGUF_LAYER_NAMES[part]
    else:
        raise ConfigError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{layer}.{hf_part}.{kind}"


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows (back to rotate-half order)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
