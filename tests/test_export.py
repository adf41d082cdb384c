"""Export to a Hugging Face directory: transformers loads it alone (its logits within the parity
bound, its tokenizer giving our ids), and models.load of the export equals the source bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_parity import _randomise, _tiny, assert_logits_match, reference_logits

from jaxdistill.models import load, loading, streaming
from jaxdistill.models.export import save_hf

forward = jax.jit(lambda model, ids: model(ids))


def params(model):
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    a, b = params(a), params(b)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_builtin_models_export_to_a_directory_transformers_loads_alone(name, request, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = request.getfixturevalue(name)
    out = tmp_path / "export"
    files = save_hf(model, tok, out, max_shard_bytes=200 * 2**20)  # several shards and an index
    assert (out / "model.safetensors.index.json").exists() and len([f for f in files if "-of-" in f]) >= 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == list(tok.eos_ids)

    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs_tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Name three primes."}]
    chat = tok.chat_text(messages)
    assert theirs_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
    for text in ["The capital of France is", chat]:
        ids = tok.encode(text, add_special_tokens="<" not in text[:2])
        assert theirs_tok(text, add_special_tokens="<" not in text[:2])["input_ids"] == ids
        assert_logits_match(forward(model, jnp.asarray([ids]))[0], reference_logits(reference, ids))
    back, back_tok = load(out)
    assert_same_params(model, back)
    assert back_tok.eos_ids == tok.eos_ids and back_tok.encode(chat) == tok.encode(chat)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def test_every_architecture_exports_its_config_and_weights(kind, tmp_path):
    """Tiny random checkpoints of each architecture (RoPE scalings, biases, q/k norms, sliding
    windows, untied heads): the exported config reads back as the same ModelConfig, transformers
    gives our logits, and the weights come back bit for bit (and within bfloat16's rounding in bfloat16)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    source = tmp_path / "source"
    _randomise(AutoModelForCausalLM.from_config(_tiny(kind)).eval(), seed=1).save_pretrained(source)
    config, weights = loading.read_hf_directory(source)
    model = loading.build_model(config, loading.canonical_to_state(config, weights))

    out = tmp_path / "export"
    save_hf(model, None, out)
    assert loading.read_config(out) == config
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 97, size=40).tolist()  # past the sliding windows of 8
    assert_logits_match(forward(model, jnp.asarray([ids]))[0], reference_logits(reference, ids))
    assert_same_params(model, streaming.load_hf_streaming(out, config))

    save_hf(model, None, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    halved = streaming.load_hf_streaming(tmp_path / "bf16", config, dtype=jnp.bfloat16)
    for path, value in params(halved).items():
        np.testing.assert_allclose(value.astype(np.float32), params(model)[path], rtol=2**-8, atol=2**-8)


def test_export_refuses_a_directory_that_is_not_empty_and_an_unknown_dtype(smollm2, tmp_path):
    from jaxdistill.main import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty; export into a new directory"):
        save_hf(*smollm2, tmp_path / "taken")
    with pytest.raises(ValueError, match="'int8' is not supported"):
        save_hf(*smollm2, tmp_path / "new", dtype="int8")
    assert main(["jaxdistill", "export", "smollm2-135m-instruct"]) == 2  # no OUT_DIR: usage, exit 2


def test_export_to_an_object_store_url_loads_back_from_it(tiny_chat_model, tmp_path, monkeypatch):
    """An OUT_DIR URL goes through tensorstore (file:// standing in for gs://, no network here)."""
    monkeypatch.setenv("JAXDISTILL_CACHE", str(tmp_path / "cache"))  # the remote mirror of small files
    model, tok = load(tiny_chat_model)
    url = f"file://{tmp_path}/bucket/model/"
    save_hf(model, tok, url, max_shard_bytes=2**20)  # several files and an index
    assert (tmp_path / "bucket" / "model" / "model.safetensors.index.json").exists()
    back, back_tok = load(url)
    assert_same_params(model, back)
    assert back_tok.encode("Hello there") == tok.encode("Hello there")
