"""GGUF files (llama.cpp's format, in which the embedded default models ship): the config from
their metadata and the weights dequantised into the canonical form of `loading` (Hugging Face
names, [out, in] layout, float32), llama.cpp's Q/K row permutation and Gemma's norm offset undone."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from jaxdistill.models.config import ConfigError, ModelConfig


@functools.lru_cache(maxsize=2)
def reader(path: Path):
    """The parsed file (memory-mapped), kept so weights and tokenizer parse it once."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on damaged files
        raise ValueError(f"{path} is not a readable GGUF file ({e}); re-download or re-assemble it.") from e


def read_config(parsed) -> ModelConfig:
    """The model config of a parsed GGUF file (`reader`), from its metadata and tensor shapes."""
    meta = {}
    for key, field in parsed.fields.items():
        if not key.startswith("tokenizer.ggml.") or key.endswith("_id"):  # skip the big vocab arrays
            meta[key] = field.contents()
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in parsed.tensors}
    return ModelConfig.from_gguf(meta, shapes)


def read(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and canonical (HF-named, [out, in], float32) weights of a GGUF file."""
    import gguf

    parsed = reader(path)
    config = read_config(parsed)
    weights = {}
    for tensor in parsed.tensors:
        expected = int(np.prod(tensor.shape))
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if array.size != expected:
            raise ValueError(f"{path}: tensor {tensor.name} is truncated; the file is damaged, re-download it.")
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
