"""Decoder models (Llama family, Gemma 3), their configs, weight loading and tokenizers."""

from jaxdistill.models.config import ConfigError, ModelConfig, RopeScaling
from jaxdistill.models.loading import BUILTIN_MODELS, ModelNotInstalled, build_model, load
from jaxdistill.models.tokenizer import Tokenizer
from jaxdistill.models.transformer import Decoder, KVCache

__all__ = [
    "BUILTIN_MODELS", "ConfigError", "Decoder", "KVCache", "ModelConfig", "ModelNotInstalled",
    "RopeScaling", "Tokenizer", "build_model", "load",
]
