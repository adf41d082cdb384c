"""One config for every decoder we run, built from GGUF metadata or a HF config.json.

The dataclass is frozen and made of hashable fields so that it can sit inside a jitted
function's static arguments (the NNX graphdef carries it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdistill.errors import ConfigError

SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
# Mixture-of-experts configs name their experts with one of these fields.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "gemma3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Llama 3.x ("llama3"), YaRN ("yarn") or linear use it."""

    kind: str = "default"
    factor: float = 1.0
    original_max_position: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None means 0.1 * ln(factor) + 1

    def __post_init__(self):
        if self.kind not in ROPE_TYPES:
            raise ConfigError(
                f"RoPE scaling type {self.kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (Llama, SmolLM2, Qwen2, Mistral) or "gemma3"
    vocab_size: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    # Layers marked local attend to the last `sliding_window` positions and use
    # `local_rope_theta` (Gemma 3 interleaves them with global layers; Mistral v0.1
    # made every layer local).
    layer_is_local: tuple[bool, ...] = ()
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma: norms after attention and MLP as well as before
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    activation: str = "silu"  # "silu" or "gelu_tanh"
    query_scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    tie_embeddings: bool = True
    max_seq_len: int = 8192

    def __post_init__(self):
        if not self.layer_is_local:
            object.__setattr__(self, "layer_is_local", (False,) * self.num_layers)
        if len(self.layer_is_local) != self.num_layers:
            raise ConfigError(f"layer_is_local has {len(self.layer_is_local)} entries, expected {self.num_layers}.")
        if any(self.layer_is_local) and not self.sliding_window:
            raise ConfigError("local layers need a sliding_window.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation {self.activation!r} is not supported; use 'silu' or 'gelu_tanh'.")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}.")

    @property
    def attention_scale(self) -> float:
        return self.query_scale or self.head_dim**-0.5

    def num_params(self) -> int:
        d, h, k, dh, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.d_ff
        per_layer = d * dh * (2 * h + 2 * k) + 3 * d * f + 2 * d * (2 if self.sandwich_norm else 1)
        per_layer += (h + 2 * k) * dh if self.qkv_bias else 0
        per_layer += 2 * dh if self.qk_norm else 0
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
        """From the dict of a Hugging Face config.json (transformers v4 or v5 layout)."""
        model_type = hf.get("model_type")
        if model_type == "gemma3":  # the multimodal wrapper: the text model is inside
            hf = _Required(hf, where, model_type)["text_config"]
            model_type = "gemma3_text"
        moe = [f for f in MOE_FIELDS if hf.get(f)]
        if moe or "moe" in str(model_type):
            raise ConfigError(
                f"{where}: {model_type!r} is a mixture-of-experts model ({', '.join(moe) or 'model_type'}), which "
                f"jaxdistill does not run; supported (dense): {', '.join(SUPPORTED_HF_TYPES)}."
            )
        if model_type not in SUPPORTED_HF_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_HF_TYPES)}."
            )
        hf = _Required(hf, where, model_type)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        common = dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            d_ff=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=hf.get("max_position_embeddings", 8192),
        )
        rope = hf.get("rope_parameters")  # transformers v5
        if model_type == "gemma3_text":
            if rope and "full_attention" in rope:
                global_rope, local_rope = rope["full_attention"], rope["sliding_attention"]
            else:
                global_rope = {"rope_theta": hf.get("rope_theta", 1e6), **(hf.get("rope_scaling") or {})}
                local_rope = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
            layer_types = hf.get("layer_types") or [
                "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
                for i in range(common["num_layers"])
            ]
            return cls(
                arch="gemma3",
                **common,
                rope_theta=global_rope["rope_theta"],
                rope_scaling=_rope_scaling_from_hf(global_rope),
                layer_is_local=tuple(t == "sliding_attention" for t in layer_types),
                sliding_window=hf.get("sliding_window"),
                local_rope_theta=local_rope["rope_theta"],
                qk_norm=True,
                sandwich_norm=True,
                embed_scale=True,
                activation="gelu_tanh",
                query_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5,
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        rope = rope or {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported for {model_type}; only 'silu'.")
        return cls(
            arch="llama",
            **common,
            rope_theta=rope["rope_theta"],
            rope_scaling=_rope_scaling_from_hf(rope),
            layer_is_local=(window is not None,) * common["num_layers"],
            sliding_window=window,
            local_rope_theta=rope["rope_theta"] if window else None,
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",  # RMSNorm of each head's q and k before RoPE
            tie_embeddings=hf.get("tie_word_embeddings", model_type != "mistral"),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        """From GGUF key/value metadata and the (numpy-order) shapes of its tensors."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise ConfigError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}."
            )

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        d_model, heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or d_model // heads)
        vocab = tensor_shapes["token_embd.weight"][0]
        layers = int(get("block_count"))
        common = dict(
            vocab_size=int(get("vocab_size") or vocab),
            d_model=d_model,
            d_ff=int(get("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv") or heads),
            head_dim=head_dim,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_seq_len=int(get("context_length", 8192)),
            tie_embeddings="output.weight" not in tensor_shapes,
        )
        scaling_type = get("rope.scaling.type")
        if "rope_freqs.weight" in tensor_shapes:
            # llama.cpp stores Llama 3.x frequency scaling as a tensor, not as metadata.
            raise ConfigError(
                "this GGUF stores Llama 3 RoPE scaling as a rope_freqs tensor, which jaxdistill does not read; "
                "load the model from its Hugging Face safetensors directory instead."
            )
        rope_scaling = RopeScaling(
            kind={None: "default", "none": "default"}.get(scaling_type, scaling_type),
            factor=float(get("rope.scaling.factor", 1.0)),
            original_max_position=int(get("rope.scaling.original_context_length", 0)),
        )
        if arch == "gemma3":
            window = int(get("attention.sliding_window"))
            # llama.cpp fixes these for Gemma 3 rather than storing them: every 6th
            # layer is global, local layers use RoPE base 10000, q scaled by 1/sqrt(head_dim).
            return cls(
                arch="gemma3",
                **common,
                rope_theta=float(get("rope.freq_base", 1e6)),
                rope_scaling=rope_scaling,
                layer_is_local=tuple((i + 1) % 6 != 0 for i in range(layers)),
                sliding_window=window,
                local_rope_theta=10000.0,
                qk_norm=True,
                sandwich_norm=True,
                embed_scale=True,
                activation="gelu_tanh",
                query_scale=head_dim**-0.5,
            )
        window = get("attention.sliding_window")
        theta = float(get("rope.freq_base", 10000.0))
        return cls(
            arch="llama",
            **common,
            rope_theta=theta,
            rope_scaling=rope_scaling,
            layer_is_local=(window is not None,) * layers,
            sliding_window=int(window) if window else None,
            local_rope_theta=theta if window else None,
            qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        )


class _Required(dict):
    """A config.json dict whose missing required fields are named, with the file, in the error."""

    def __init__(self, data: Mapping[str, Any], where: str, model_type: str):
        super().__init__(data)
        self.where, self.model_type = where, model_type

    def __missing__(self, key):
        raise ConfigError(f"{self.where} has no {key!r} field, which a {self.model_type} config needs; "
                          "is this the model's own config.json?")


def _rope_scaling_from_hf(rope: Mapping[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    return RopeScaling(
        kind=kind,
        factor=float(rope.get("factor", 1.0)),
        original_max_position=int(rope.get("original_max_position_embeddings") or 0),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        attention_factor=rope.get("attention_factor"),
    )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] and the factor cos/sin are multiplied by."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = scaling.factor
    if scaling.kind == "default":
        return inv_freq, 1.0
    if scaling.kind == "linear":
        return inv_freq / factor, 1.0
    if scaling.kind == "llama3":
        old = scaling.original_max_position
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, keep high ones, ramp between the two.
    old = scaling.original_max_position

    def correction_dim(rotations):
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    ramp = np.clip((np.arange(head_dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    keep = 1.0 - ramp
    inv = inv_freq / factor * (1 - keep) + inv_freq * keep
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, float(attention_factor)


def hf_layer_names(config: ModelConfig) -> dict[str, str]:
    """Our per-layer parameter name -> its name inside a Hugging Face checkpoint's layer."""
    names = {
        "attn_norm": "input_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight",
        "w_gate": "mlp.gate_proj.weight",
        "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight",
    }
    if config.arch == "gemma3":
        names |= {
            "attn_post_norm": "post_attention_layernorm.weight",
            "mlp_norm": "pre_feedforward_layernorm.weight",
            "mlp_post_norm": "post_feedforward_layernorm.weight",
        }
    else:
        names["mlp_norm"] = "post_attention_layernorm.weight"
    if config.qk_norm:
        names |= {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
    if config.qkv_bias:
        names |= {"bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
    return names


def hf_tensor_names(config: ModelConfig) -> dict[tuple, str | list[str]]:
    """Our state path -> its tensor name in a Hugging Face checkpoint (a list of per-layer names
    for the stacked layer parameters)."""
    names: dict[tuple, str | list[str]] = {("embed",): "model.embed_tokens.weight",
                                           ("final_norm",): "model.norm.weight"}
    if not config.tie_embeddings:
        names[("lm_head",)] = "lm_head.weight"
    for ours, theirs in hf_layer_names(config).items():
        names[("layers", ours)] = [f"model.layers.{i}.{theirs}" for i in range(config.num_layers)]
    return names


# Architectures by name, for compiling without weights (`python -m jaxdistill compile
# --config.model=qwen3-8b`): the config.json fields we read, as the models publish them.
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8, max_position_embeddings=40960,
              rms_norm_eps=1e-6, rope_theta=1000000, hidden_act="silu")
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-1.7b": _QWEN3 | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-8b": _QWEN3 | dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                              tie_word_embeddings=False),
    "qwen3-32b": _QWEN3 | dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                               num_attention_heads=64, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
                       tie_word_embeddings=False, rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                                    low_freq_factor=1.0, high_freq_factor=4.0,
                                                                    original_max_position_embeddings=8192)),
}
