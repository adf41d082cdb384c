"""Our logits and greedy continuations against transformers' PyTorch models on the same weights.

Tolerance: max |ours - reference| <= 1e-3 * max |reference| over every position and vocabulary
entry, in float32. Measured (SmolLM2, Gemma 3 at 900 tokens): about 5e-6 and 5e-5 of the scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdistill import sampling
from jaxdistill.models import load
from jaxdistill.models.config import ConfigError

RELATIVE_TOLERANCE = 1e-3

PROMPTS = [
    "The capital of France is",
    "Question: Tom has 3 boxes of 12 pencils and gives away 7. How many pencils are left?\nAnswer:",
]
# Past Gemma 3's 512-token sliding window, so local and global layers differ.
LONG_PROMPT = " ".join(f"Step {i}: add {i % 7} to the total, which is now {i * 3}." for i in range(60))


def assert_logits_match(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = np.abs(theirs).max()
    diff = np.abs(ours - theirs).max()
    assert diff <= RELATIVE_TOLERANCE * scale, f"max |diff| {diff:.3g} > {RELATIVE_TOLERANCE} * scale {scale:.3g}"


def reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits.numpy()[0]


def reference_greedy(ref, ids, n, eos_ids):
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=list(eos_ids),
                           pad_token_id=0)
    return out[0, len(ids):].tolist()


forward = jax.jit(lambda model, ids, mask=None: model(ids, mask=mask))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_gguf_logits_match_transformers(name, request, hf_reference):
    model, tok = request.getfixturevalue(name.split("-")[0])
    ref = hf_reference(name)
    short = [tok.encode(text, add_special_tokens="<" not in text[:2])
             for text in PROMPTS + [tok.chat_text([{"role": "user", "content": "Name three primes."}])]]
    # the short prompts in one right-padded batch (one compiled forward): the padding comes after
    # every real token, so a causal model's logits at the real positions cannot see it
    tokens = np.full((len(short), max(map(len, short))), tok.pad_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for row, ids in enumerate(short):
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
    logits = forward(model, jnp.asarray(tokens), jnp.asarray(mask))
    for row, ids in enumerate(short):
        assert_logits_match(logits[row, : len(ids)], reference_logits(ref, ids))
    ids = tok.encode(LONG_PROMPT)
    if name.startswith("gemma"):
        assert len(ids) > 512 + 64, "the long prompt must reach well past the sliding window"
    assert_logits_match(forward(model, jnp.asarray([ids]))[0], reference_logits(ref, ids))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_gguf_greedy_continuations_match_transformers(name, request, hf_reference):
    model, tok = request.getfixturevalue(name.split("-")[0])
    ref = hf_reference(name)
    prompts = [tok.encode(PROMPTS[1]), tok.chat([{"role": "user", "content": "Write a sentence about rivers."}])]
    ours = sampling.generate(model, prompts, max_new_tokens=32, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    for ids, seq in zip(prompts, ours.sequences(), strict=True):
        assert seq == reference_greedy(ref, ids, 32, tok.eos_ids)


# ------------------------------------------------------------ tiny checkpoints


def _randomise(model, seed):
    """Random weights, norms included, so that no layout or scale error can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def _tiny(kind):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if kind == "llama":  # Llama 3.x style RoPE scaling, untied head
        return LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))
    if kind == "qwen2":  # q/k/v biases, YaRN
        return Qwen2Config(**common, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))
    if kind == "qwen3":  # q/k norms, head_dim set apart from hidden_size / heads, untied head
        return Qwen3Config(**common, head_dim=24, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="default", rope_theta=1000000.0))
    if kind == "mistral":  # every layer local with a small window
        return MistralConfig(**common, sliding_window=8, tie_word_embeddings=False, head_dim=16)
    return Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=32, sliding_window=8,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"], query_pre_attn_scalar=24)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def tiny_checkpoint(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    kind = request.param
    torch.manual_seed(0)
    model = _randomise(AutoModelForCausalLM.from_config(_tiny(kind)).eval(), seed=1)
    path = tmp_path_factory.mktemp(kind)
    if kind == "mistral":
        model.to(torch.bfloat16).save_pretrained(path)  # bfloat16 files
    elif kind == "llama":
        model.save_pretrained(path, max_shard_size="100KB")  # sharded, with an index
    else:
        model.save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return kind, path, reference


def test_tiny_checkpoint_logits_and_greedy_match(tiny_checkpoint):
    from jaxdistill.models.loading import build_model, canonical_to_state, read_hf_directory

    kind, path, reference = tiny_checkpoint
    if kind == "llama":
        assert (path / "model.safetensors.index.json").exists()
    config, weights = read_hf_directory(path)
    model = build_model(config, canonical_to_state(config, weights))
    rng = np.random.default_rng(0)
    for length in (5, 40):  # 40 > the sliding window of 8 and the yarn/llama3 original length of 32
        ids = rng.integers(3, 97, size=length).tolist()
        assert_logits_match(forward(model, jnp.asarray([ids]))[0], reference_logits(reference, ids))
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (3, 11)]
    ours = sampling.generate(model, prompts, max_new_tokens=16, eos_ids=(2,))
    for ids, seq in zip(prompts, ours.sequences(), strict=True):
        assert seq == reference_greedy(reference, ids, 16, (2,))


def test_bfloat16_params_stay_close_to_float32(smollm2):
    """bfloat16 parameters and compute: same argmax almost everywhere, logits within bf16 noise."""
    model32, tok = smollm2
    model16, _ = load("smollm2-135m-instruct", dtype="bfloat16")
    assert model16.layers.wq[...].dtype == jnp.bfloat16
    ids = jnp.asarray([tok.encode(PROMPTS[1])])
    a, b = np.asarray(forward(model32, ids)), np.asarray(forward(model16, ids))
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


@pytest.mark.parametrize("mesh_shape,dtype", [(None, "float32"), ({"data": 2, "fsdp": 2, "tensor": 2}, "float32"),
                                              ({"fsdp": 4, "tensor": 2}, "bfloat16")])
def test_streaming_load_equals_the_eager_reader_on_any_mesh(tiny_checkpoint, mesh_shape, dtype):
    """Every parameter read slice by slice into its sharding equals the whole-file reader's."""
    from flax import nnx

    from jaxdistill import mesh as mesh_lib
    from jaxdistill.models.loading import DTYPES, canonical_to_state, read_hf_directory
    from jaxdistill.models.streaming import load_hf_streaming

    _, path, _ = tiny_checkpoint
    config, weights = read_hf_directory(path)
    eager = canonical_to_state(config, weights)
    mesh = mesh_lib.make_mesh(mesh_shape) if mesh_shape else None
    model = load_hf_streaming(path, config, dtype=DTYPES[dtype], mesh=mesh)
    split = 0
    for state_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        assert value.dtype == DTYPES[dtype]
        np.testing.assert_array_equal(np.asarray(value.astype(np.float32)),
                                      eager[state_path].astype(DTYPES[dtype]).astype(np.float32))
        if mesh is not None:
            expected = mesh_lib.param_sharding(mesh, variable.get_metadata()["axes"], value.shape)
            assert value.sharding.is_equivalent_to(expected, value.ndim)
            split += len(value.addressable_shards) > 1 and value.addressable_shards[0].data.size < value.size
    assert mesh is None or split > 0  # some parameters really are split


def test_streaming_load_names_a_truncated_file_and_a_contradicting_config(tiny_checkpoint, tmp_path):
    import json
    import shutil

    kind, path, _ = tiny_checkpoint
    if kind != "qwen3":
        pytest.skip("one architecture is enough")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        load(broken)
    wrong = tmp_path / "wrong"
    shutil.copytree(path, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    with pytest.raises(ConfigError, match="has shape .* but the config implies"):
        load(wrong)


def test_a_remote_directory_streams_through_tensorstore_like_a_local_one(tiny_checkpoint, tmp_path, monkeypatch):
    """gs:// directories go through tensorstore's kvstore; its file:// driver stands in for GCS
    here (no network): small files are mirrored, the weights read in byte ranges from the store."""
    import shutil

    from flax import nnx

    from jaxdistill.models.loading import read_config, resolve
    from jaxdistill.models.streaming import REMOTE_MARKER, load_hf_streaming

    kind, path, _ = tiny_checkpoint
    if kind not in ("llama", "qwen3"):  # sharded with an index; one file
        pytest.skip("two layouts are enough")
    monkeypatch.setenv("JAXDISTILL_CACHE", str(tmp_path / "cache"))
    mirror = resolve(f"file://{path}")
    assert (mirror / REMOTE_MARKER).read_text() == f"file://{path}/"
    assert (mirror / "config.json").exists() and not list(mirror.glob("*.safetensors"))  # weights stay remote
    local = load_hf_streaming(path, read_config(path))
    remote = load_hf_streaming(mirror, read_config(mirror))
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(local, nnx.Param)),
                              nnx.to_flat_state(nnx.state(remote, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for file in broken.glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"file://{broken}/.*truncated"):
        load_hf_streaming(resolve(f"file://{broken}"), read_config(path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(f"file://{tmp_path / 'cache'}")
