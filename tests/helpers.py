"""Small real models with random weights, for tests that need no pretrained weights."""

from flax import nnx

from jaxdistill.models import Decoder, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """Gemma-3-like by default: local/global layers with a small window, so caches cross it."""
    fields = dict(arch="gemma3", vocab_size=64, d_model=32, d_ff=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=10000.0, local_rope_theta=1000.0, sliding_window=6,
                  layer_is_local=(True, True, False, True), qk_norm=True, sandwich_norm=True, embed_scale=True,
                  activation="gelu_tanh", max_seq_len=256)
    return ModelConfig(**(fields | overrides))


def tiny_model(seed=0, **overrides) -> Decoder:
    return Decoder(tiny_config(**overrides), rngs=nnx.Rngs(seed))
