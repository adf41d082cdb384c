import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_model

from jaxdistill import sampling


def test_batched_generation_equals_one_prompt_at_a_time(smollm2):
    model, tok = smollm2
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("Hi", "Name a large animal.", "What is 3+4?")]
    batched = sampling.generate(model, prompts, max_new_tokens=12, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    for i, p in enumerate(prompts):
        alone = sampling.generate(model, [p], max_new_tokens=12, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
        assert batched.sequences()[i] == alone.sequences()[0]
        np.testing.assert_allclose(batched.logprobs[i][batched.mask[i]], alone.logprobs[0][alone.mask[0]],
                                   atol=2e-4)


def test_logprobs_equal_a_full_forward_over_prompt_and_output():
    """The KV cache path (across a sliding window of 6) scores tokens like one full forward."""
    model = tiny_model()
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 4, 9, 10, 11]]
    out = sampling.generate(model, prompts, max_new_tokens=20, rule=sampling.Sample(1.0), rng=3)
    for prompt, new, logprobs in zip(prompts, out.tokens, out.logprobs, strict=True):
        full = jnp.asarray([prompt + new.tolist()])
        logp = jax.nn.log_softmax(model(full)[0], axis=-1)
        expected = logp[len(prompt) - 1 : -1][np.arange(len(new)), new]
        np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_same_key_same_samples_other_key_other_samples():
    model = tiny_model()
    rule = sampling.Sample(temperature=1.0, top_k=20, top_p=0.95)
    a = sampling.generate(model, [[1, 2, 3]] * 4, max_new_tokens=16, rule=rule, rng=7)
    b = sampling.generate(model, [[1, 2, 3]] * 4, max_new_tokens=16, rule=rule, rng=7)
    c = sampling.generate(model, [[1, 2, 3]] * 4, max_new_tokens=16, rule=rule, rng=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens}) > 1, "rows draw from their own keys"


@dataclasses.dataclass(frozen=True)
class StopFirstRowAtStep2:
    """A plugged-in next-token rule: row 0 emits EOS (=2) at step 2, everything else token 5."""

    def __call__(self, logits, keys, step):
        row = jnp.arange(logits.shape[0])
        return jnp.where((row == 0) & (step == 2), 2, 5).astype(jnp.int32)


def test_each_row_stops_at_its_own_eos_with_a_custom_rule():
    out = sampling.generate(tiny_model(), [[1, 2], [3, 4, 5]], max_new_tokens=6, rule=StopFirstRowAtStep2(),
                            eos_ids=(2,), pad_id=0)
    np.testing.assert_array_equal(out.tokens[0], [5, 5, 2, 0, 0, 0])
    np.testing.assert_array_equal(out.mask[0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.tokens[1], [5] * 6)
    assert out.lengths.tolist() == [3, 6]
    assert (out.logprobs[0, 3:] == 0).all() and (out.logprobs[1] < 0).all()


def _numpy_filter(logits, top_k, top_p):
    """Top-k, then top-p over the renormalised survivors (the order transformers uses too)."""
    out = logits.copy()
    for row in out:
        order = np.argsort(-row, kind="stable")[: top_k or len(row)]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep = np.isin(np.arange(len(row)), order[before < top_p])
        row[~keep] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.5), (1, 1.0), (0, 1e-6)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    ours = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(_numpy_filter(logits, top_k, top_p)))


def test_sample_frequencies_follow_the_tempered_filtered_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rule = sampling.Sample(temperature=0.7, top_k=4)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: rule(logits, k[None], 0)[0])(keys))
    expected = np.asarray(jax.nn.softmax(sampling.filter_logits(logits / 0.7, 4, 1.0))[0])
    np.testing.assert_allclose(np.bincount(draws, minlength=6) / len(draws), expected, atol=0.012)


def test_shapes_are_bucketed_so_lengths_share_a_compilation():
    model = tiny_model(seed=1)
    sampling.generate(model, [[1] * 5], max_new_tokens=10)
    before = sampling._decode_jit._cache_size()
    for n, new in ((9, 12), (13, 16), (16, 9)):  # same prompt bucket (16) and new-token bucket (16)
        sampling.generate(model, [[2] * n, [3] * (n - 1)], max_new_tokens=new)
    after_two_rows = sampling._decode_jit._cache_size()
    assert after_two_rows == before + 1  # one compile for the 2-row bucket, none per length


def test_bad_requests_say_what_to_do():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one token"):
        sampling.generate(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sampling.generate(model, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="Greedy"):
        sampling.Sample(temperature=0.0)


def test_chat_helper_uses_the_template_and_stops_at_end_of_turn(smollm2):
    model, tok = smollm2
    [reply] = sampling.chat(model, tok, "What is the capital of France? One word.", max_new_tokens=24)
    assert "Paris" in reply
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


@pytest.mark.parametrize("shape", [{"data": -1}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1}])
def test_rows_split_over_a_mesh_sample_exactly_what_one_device_samples(shape):
    """Data-parallel decoding: each device decodes its own rows, and the random draws do not
    depend on how the batch is split (so a multi-process run samples what one process would)."""
    from jaxdistill import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(shape, jax.devices() if shape != {"data": 1} else jax.devices()[:1])
    model = tiny_model(seed=2)
    sharded = mesh_lib.shard_model(tiny_model(seed=2), mesh)
    prompts = [[1, 5, 9], [3], [7, 7, 7, 7, 2], [4, 8], [6]]  # 5 rows: the mesh pads them to a multiple
    rule = sampling.Sample(temperature=1.0)
    alone = sampling.generate(model, prompts, max_new_tokens=10, rule=rule, rng=3)
    split = sampling.generate(sharded, prompts, max_new_tokens=10, rule=rule, rng=3, mesh=mesh)
    np.testing.assert_array_equal(split.tokens, alone.tokens)
    np.testing.assert_allclose(split.logprobs, alone.logprobs, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [None, {"data": 4, "tensor": 2}])
def test_repeated_prompts_are_prefilled_once_and_sample_exactly_as_without_sharing(mesh_shape):
    """On a mesh a copy's prompt row may sit on another device; the samples still equal one
    device's without sharing."""
    from jaxdistill import mesh as mesh_lib

    model = tiny_model(seed=4)
    prompts = [[1, 5, 9], [3, 3], [1, 5, 9], [1, 5, 9], [3, 3], [7]]  # 3 distinct prompts, 6 rows
    rule = sampling.Sample(temperature=1.0)
    alone = sampling.generate(model, prompts, max_new_tokens=12, rule=rule, rng=5, eos_ids=(2,), share_prompts=False)
    mesh = None if mesh_shape is None else mesh_lib.make_mesh(mesh_shape)
    if mesh is not None:
        model = mesh_lib.shard_model(model, mesh)
    shared = sampling.generate(model, prompts, max_new_tokens=12, rule=rule, rng=5, eos_ids=(2,), mesh=mesh)
    np.testing.assert_array_equal(shared.tokens, alone.tokens)
    np.testing.assert_array_equal(shared.mask, alone.mask)
    np.testing.assert_allclose(shared.logprobs, alone.logprobs, atol=1e-5)
    assert len({tuple(r) for r in shared.tokens[[0, 2, 3]]}) > 1  # copies of one prompt still sample apart


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_compacting_finished_rows_samples_exactly_what_the_full_batch_samples(mesh_shape, monkeypatch):
    """Rows that end early leave the batch every few steps; each row keeps its own random key,
    so tokens, log-probs and masks equal decoding the whole batch to the end."""
    from jaxdistill import mesh as mesh_lib

    mesh = None if mesh_shape is None else mesh_lib.make_mesh(mesh_shape)
    model = tiny_model(seed=6)
    if mesh is not None:
        model = mesh_lib.shard_model(model, mesh)
    prompts = [[1, 5, 9], [3, 3], [7], [4, 8, 8, 1], [6, 2], [9], [5, 5, 5], [8]] * 2  # 16 rows
    rule = sampling.Sample(temperature=1.5)
    common = dict(max_new_tokens=40, rule=rule, rng=11, eos_ids=(2, 3, 4), mesh=mesh)
    batches = []
    compact_rows = sampling._compact
    monkeypatch.setattr(sampling, "_compact", lambda d, rows: batches.append(rows) or compact_rows(d, rows))
    compact = sampling.generate(model, prompts, compact_every=4, **common)
    full = sampling.generate(model, prompts, compact_every=0, **common)
    assert batches and batches == sorted(batches, reverse=True) and batches[-1] < 16  # the batch did shrink
    np.testing.assert_array_equal(compact.tokens, full.tokens)
    np.testing.assert_array_equal(compact.mask, full.mask)
    np.testing.assert_allclose(compact.logprobs, full.logprobs, atol=1e-5)
