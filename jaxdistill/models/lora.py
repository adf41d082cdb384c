"""LoRA: low-rank adapters on the attention and MLP projections, as PEFT computes them.

`add_lora(model, LoraConfig(rank=r, ...))` gives each target projection W (stacked over
layers, like W) two factors: A [layers, *in, r], uniform in +-1/sqrt(fan_in) as PEFT draws
it, and B [layers, r, *out], zeros, so a fresh adapter changes nothing. The projection
becomes `x W + (alpha / r) * dropout(x) A B`. The factors are `nnx.LoRAParam`s, which the
train state keeps apart from the frozen base weights (only they get gradients and optimizer
state). `merge_adapters(model)` folds them into W for export; `peft_tensors` names them as a PEFT
adapter directory stores them.

Our own rather than qwix's LoraProvider: qwix intercepts a module's matmuls and creates one
adapter per intercepted call, but our blocks run under `lax.scan` over weights stacked on a
`layers` axis, so every layer would share one adapter. Stacked factors keep the scan.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.errors import ConfigError
from jaxdistill.models.blocks import fold_lora, lora_factors

# PEFT's target module names -> (our weight, how many leading axes are its input)
TARGETS = {"q_proj": ("wq", 1), "k_proj": ("wk", 1), "v_proj": ("wv", 1), "o_proj": ("wo", 2),
           "gate_proj": ("w_gate", 1), "up_proj": ("w_up", 1), "down_proj": ("w_down", 1)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: tuple[str, ...] = tuple(TARGETS)  # PEFT's names: attention q/k/v/o_proj, MLP gate/up/down_proj

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1 (0 turns LoRA off), got {self.rank}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets {unknown or '()'}: choose from {list(TARGETS)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, c) -> LoraConfig | None:
        """A config's `lora` block, a ConfigDict or a dict (rank 0 or missing: no LoRA)."""
        if c is None or not c.get("rank", 0):
            return None
        return cls(rank=int(c.get("rank")), alpha=float(c.get("alpha", 16.0)), dropout=float(c.get("dropout", 0.0)),
                   targets=tuple(c.get("targets", tuple(TARGETS))))


def add_lora(model, lora: LoraConfig, *, seed: int = 0):
    """Give `model` (a Decoder, possibly on a mesh or abstract) adapters for `lora.targets`, in its
    parameter dtype and in the shardings their axes give. In place; returns the model."""
    from jaxdistill import mesh as mesh_lib

    if getattr(model, "lora", None) is not None:
        raise ConfigError("this model already has LoRA adapters.")
    layers = model.layers
    key = jax.random.key(seed)
    for i, target in enumerate(lora.targets):
        weight, inputs = TARGETS[target]
        param = getattr(layers, weight)
        value, axes = param.get_value(), param.get_metadata()["axes"]
        fan_in = math.prod(value.shape[1:1 + inputs])
        a_shape = (*value.shape[:1 + inputs], lora.rank)
        b_shape = (value.shape[0], lora.rank, *value.shape[1 + inputs:])
        a_axes, b_axes = (*axes[:1 + inputs], "lora_rank"), (axes[0], "lora_rank", *axes[1 + inputs:])
        if isinstance(value, jax.ShapeDtypeStruct):  # an abstract model: abstract adapters
            a, b = jax.ShapeDtypeStruct(a_shape, value.dtype), jax.ShapeDtypeStruct(b_shape, value.dtype)
        else:
            bound = fan_in ** -0.5
            a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound).astype(value.dtype)
            b = jnp.zeros(b_shape, value.dtype)
        name_a, name_b = lora_factors(weight)
        setattr(layers, name_a, nnx.LoRAParam(a, axes=a_axes))
        setattr(layers, name_b, nnx.LoRAParam(b, axes=b_axes))
    model.lora = lora
    model.custom_backward = False  # the hand-written block backward has no adapter gradients
    mesh = mesh_lib.mesh_of(nnx.state(model, nnx.Param))
    if mesh is not None:  # the adapters where their axes put them; the base weights stay where they are
        mesh_lib.shard_model(model, mesh, nnx.LoRAParam)
    return model


def merged_weight(w, a, b, scale: float):
    """W + scale * A B for stacked factors A [layers, *in, r], B [layers, r, *out], layer by layer."""
    return jax.vmap(lambda w, a, b: fold_lora(w, a, b, scale))(w, a, b)


def merge_adapters(model):
    """Fold the adapters into their weights and drop them: the plain model a LoRA run ends as (in
    place; returns the model). A model without adapters is returned as it is."""
    lora = getattr(model, "lora", None)
    if lora is None:
        return model
    layers = model.layers
    for target in lora.targets:
        weight = TARGETS[target][0]
        name_a, name_b = lora_factors(weight)
        param = getattr(layers, weight)
        merged = jax.jit(merged_weight, static_argnums=3)(param.get_value(), getattr(layers, name_a).get_value(),
                                                          getattr(layers, name_b).get_value(), lora.scale)
        param.set_value(merged)
        delattr(layers, name_a)
        delattr(layers, name_b)
    model.lora = None
    return model


def peft_tensors(model) -> dict[str, np.ndarray]:
    """The adapters as a PEFT adapter directory stores them: per layer and target,
    `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r] (float32)."""
    from jaxdistill.models.config import hf_layer_names

    layer_names = hf_layer_names(model.config)
    out = {}
    for target in model.lora.targets:
        weight, _ = TARGETS[target]
        module = layer_names[weight].removesuffix(".weight")
        a, b = (np.asarray(jax.device_get(getattr(model.layers, n).get_value()), np.float32)
                for n in lora_factors(weight))
        layers, rank = a.shape[0], a.shape[-1]
        for i in range(layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def peft_config(lora: LoraConfig, base: str) -> dict:
    """adapter_config.json of a PEFT LoRA adapter on `base` (a path or hub id of the base model)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
