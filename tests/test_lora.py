"""LoRA: adapters that start as no change, gradients equal to differentiating the merged weight,
only the adapters train, the frozen base model as the self-distillation teacher, and a LoRA
run's export (merged for transformers, an adapter directory for PEFT)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model

from jaxdistill.distill import step as step_lib
from jaxdistill.errors import ConfigError
from jaxdistill.models import lora as lora_lib

TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 64, (4, 12)))
SMALL = dict(num_layers=2, layer_is_local=(True, False))  # the Gemma-like tiny model, two layers


@functools.partial(nnx.jit, static_argnames=("base", "stride", "frozen_rows_base", "logits"))
def run(model, tokens, key=None, *, base=False, stride=1, frozen_rows_base=False, logits=False):
    """Jitted hidden states (or logits) of `model` (eager calls would recompile the layer scan each time)."""
    hidden, _ = model.hidden_states(tokens, base=base, grad_rows_stride=stride, frozen_rows_base=frozen_rows_base,
                                    dropout_key=key)
    return model.logits(hidden) if logits else hidden


def with_adapters(lora: lora_lib.LoraConfig, seed=1):
    """A tiny model with adapters whose B factors are random (a fresh adapter is zero: no test)."""
    model = lora_lib.add_lora(tiny_model(**SMALL), lora)
    for name, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if name[-1].endswith("_lora_b"):
            key = jax.random.fold_in(jax.random.key(seed), hash(name[-1]) % 2**31)
            variable.set_value(0.05 * jax.random.normal(key, variable.get_value().shape))
    return model


def merged_copy(model):
    base = nnx.clone(model)
    return lora_lib.merge_adapters(base)


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_equals_its_merged_weights():
    plain = tiny_model(**SMALL)
    fresh = lora_lib.add_lora(nnx.clone(plain), lora_lib.LoraConfig(rank=4))
    np.testing.assert_allclose(run(fresh, TOKENS), run(plain, TOKENS), atol=1e-6)
    model = with_adapters(lora_lib.LoraConfig(rank=4, alpha=8.0))
    merged = merged_copy(model)
    assert merged.lora is None and not nnx.state(merged, nnx.LoRAParam)
    assert not np.allclose(run(model, TOKENS), run(plain, TOKENS), atol=1e-3)  # the adapters do something
    np.testing.assert_allclose(run(merged, TOKENS, logits=True), run(model, TOKENS, logits=True), atol=2e-5)
    # training runs the adapters beside their weights; inference here folds them in (fewer FLOPs): the same
    np.testing.assert_allclose(run(model, TOKENS, jax.random.key(0)), run(model, TOKENS), atol=2e-5)
    np.testing.assert_array_equal(run(model, TOKENS, base=True), run(plain, TOKENS))  # adapters off: the base


def test_adapter_gradients_equal_differentiating_the_merged_weight():
    lora = lora_lib.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "o_proj", "down_proj"))
    model = with_adapters(lora)
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)

    def ours(adapters):  # a training forward (a key): the adapters run beside their weights
        model = nnx.merge(graphdef, adapters, base)
        return jnp.mean(model.logits(model.hidden_states(TOKENS, dropout_key=jax.random.key(0))[0]) ** 2)

    plain_graph, plain_state = nnx.split(tiny_model(**SMALL))

    def reference(adapters):  # W + scale A B written into a model without adapters
        flat = dict(nnx.to_flat_state(nnx.state(nnx.merge(graphdef, adapters, base), nnx.Param)))
        layers = {}
        for target in lora.targets:
            weight = lora_lib.TARGETS[target][0]
            a, b = (flat[("layers", n)].get_value() for n in lora_lib.lora_factors(weight))
            layers[weight] = lora_lib.merged_weight(flat[("layers", weight)].get_value(), a, b, lora.scale)
        state = jax.tree.map(lambda x: x, plain_state)
        for weight, value in layers.items():
            state["layers"][weight].set_value(value)
        return jnp.mean(nnx.merge(plain_graph, state)(TOKENS) ** 2)

    for got, want in zip(jax.tree.leaves(jax.jit(jax.grad(ours))(adapters)),
                         jax.tree.leaves(jax.jit(jax.grad(reference))(adapters)), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)


def test_only_the_adapters_train_and_only_they_have_optimizer_state():
    model = with_adapters(lora_lib.LoraConfig(rank=2))
    base_before = jax.tree.map(np.asarray, nnx.state(model, lambda path, v: not isinstance(v, nnx.LoRAParam)
                                                     and isinstance(v, nnx.Param)))
    tx = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4))
    graphdef, state = step_lib.init_state(model, tx, frozen_teacher=True)
    assert state.teacher_params is None  # the base model teaches: nothing is copied
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted(adapter_shapes * 2)  # Adam's mu and nu of each adapter, nothing else
    batch = step_lib.build_batch([[5, 6, 7], [8, 9]], [[5, 6, 7, 10, 11], [8, 9, 12]], [[13, 14, 15], [16, 17]],
                                 pad_id=0, multiple=8)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, base_teacher=True))
    adapters_before = jax.tree.map(np.asarray, state.params)
    for i in range(2):  # the learning rate warms up from 0
        state, _ = step(state, batch, jax.random.key(i))
    for got, want in zip(jax.tree.leaves(state.frozen_params), jax.tree.leaves(base_before), strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                        jax.tree.leaves(adapters_before), strict=True))
    assert state.without_frozen().frozen_params is None  # what a checkpoint holds


def test_the_base_model_teacher_rows_of_the_combined_forward_are_a_separate_base_forward():
    model = with_adapters(lora_lib.LoraConfig(rank=4, dropout=0.3))
    plain_hidden = run(model, TOKENS, base=True)
    live_hidden = run(model, TOKENS)
    key = jax.random.key(3)
    combined = run(model, TOKENS, key, stride=2, frozen_rows_base=True)
    np.testing.assert_allclose(combined[1::2], plain_hidden[1::2], atol=1e-6)  # teacher rows: the base model
    student = run(model, TOKENS[0::2], key)
    np.testing.assert_allclose(combined[0::2], student, atol=1e-6)  # student rows: adapters, with dropout
    assert not np.allclose(student, live_hidden[0::2], atol=1e-4)  # dropout acts in training...
    np.testing.assert_allclose(run(model, TOKENS[0::2]), live_hidden[0::2], atol=1e-6)  # ...only

    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    hidden = {}
    for base_teacher in (False, True):
        def teacher_rows(adapters, base_teacher=base_teacher):
            tokens = jnp.repeat(TOKENS[:2], 2, axis=0)
            h = nnx.merge(graphdef, adapters, base).hidden_states(tokens, grad_rows_stride=2,
                                                                  frozen_rows_base=base_teacher)[0]
            return h[1::2].sum(), h
        grads, hidden[base_teacher] = jax.jit(jax.grad(teacher_rows, has_aux=True))(adapters)
        assert all(not np.any(g) for g in jax.tree.leaves(grads))  # teacher rows: no gradient either way
    np.testing.assert_allclose(hidden[True][1::2], plain_hidden[:2], atol=1e-5)
    np.testing.assert_allclose(hidden[False][1::2], live_hidden[:2], atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(rank=-1), "lora.rank must be >= 1"),
    (dict(rank=4, targets=("q", "v_proj")), r"lora.targets \['q'\]"),
    (dict(rank=4, dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
])
def test_bad_lora_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        lora_lib.LoraConfig(**settings)


def test_lora_state_leaves_live_where_their_parameters_live_on_a_mesh():
    from test_compile import BIG, assert_placed_like_params

    from jaxdistill import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"fsdp": 4}, devices=jax.devices()[:4])
    base = mesh_lib.shard_model(tiny_model(**BIG), mesh)
    base_shardings = [x.sharding for x in jax.tree.leaves(nnx.state(base, nnx.Param))]
    model = lora_lib.add_lora(base, lora_lib.LoraConfig(rank=4))
    tx = step_lib.make_optimizer(step_lib.OptimConfig(accumulate=2))
    graphdef, state = step_lib.init_state(model, tx, frozen_teacher=True)
    assert [x.sharding for x in jax.tree.leaves(state.frozen_params)] == base_shardings  # the base did not move
    a = nnx.state(model, nnx.LoRAParam)["layers"]["wq_lora_a"].get_value()
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # split like wq's input axis
    assert_placed_like_params(tx, dataclasses.replace(state, teacher_params=state.params), mesh, min_moments=3 * 7)
    b = step_lib.build_batch([[3, 4], [5]] * 2, [[6, 7, 8], [9, 9]] * 2, [[10, 11, 2], [12, 2]] * 2, pad_id=0,
                             multiple=8)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, base_teacher=True), state, mesh)
    state, _ = step(state, mesh_lib.host_to_global(b, mesh), jax.random.key(0))
    assert_placed_like_params(tx, dataclasses.replace(state, teacher_params=state.params), mesh, min_moments=3 * 7)


def test_a_lora_run_resumes_exactly_and_exports_merged_for_transformers_and_as_a_peft_adapter(
        tmp_path, capsys, tiny_chat_model):
    """The default job with --config.lora.rank=4, the base model as teacher and adapter dropout:
    its checkpoints hold the adapters (not the base), a continued run equals a straight one, and
    `export` writes the merged model (transformers) and, with --adapter, a PEFT adapter (peft)."""
    import json

    import torch
    from peft import PeftModel
    from test_distill import _metrics, tiny_run_config
    from test_parity import assert_logits_match, reference_logits
    from transformers import AutoModelForCausalLM

    from jaxdistill.distill import train as train_lib
    from jaxdistill.main import main
    from jaxdistill.models import load

    def config(workdir, steps):
        c = tiny_run_config(tmp_path / workdir, steps=steps, model=tiny_chat_model)
        c.lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1}
        c.frozen_teacher = True
        c.optim.lr, c.optim.warmup_steps = 1e-2, 0
        return c

    train_lib.run(config("straight", 2))
    train_lib.run(config("continued", 1))
    longer = config("continued", 2)
    longer.resume = "ignore_config_changes"
    train_lib.run(longer)
    assert _metrics(tmp_path / "continued") == [{**m, "seconds": n["seconds"], "tokens_per_s": n["tokens_per_s"]}
                                                for m, n in zip(_metrics(tmp_path / "straight"),
                                                                _metrics(tmp_path / "continued"), strict=True)]
    checkpoint_bytes = sum(p.stat().st_size for p in (tmp_path / "straight" / "checkpoints").rglob("*") if p.is_file())
    base, tokenizer = load(tiny_chat_model)
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    assert checkpoint_bytes < base_bytes / 2  # adapters and their moments, not the base weights

    trained, _ = load(tmp_path / "straight")
    assert trained.lora == lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    base_state = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for path, variable in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
        if isinstance(variable, nnx.LoRAParam):
            assert not path[-1].endswith("_lora_b") or np.any(variable.get_value())  # trained
        else:
            np.testing.assert_array_equal(variable.get_value(), base_state[path].get_value())  # frozen
    ids = tokenizer.chat([{"role": "user", "content": "What is 2 + 3?"}])
    ours = trained(jnp.asarray([ids]))[0]

    assert main(["jaxdistill", "export", str(tmp_path / "straight"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert_logits_match(ours, reference_logits(merged, ids))

    assert main(["jaxdistill", "export", str(tmp_path / "straight"), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32),
                                           tmp_path / "adapter").eval()
    assert_logits_match(ours, reference_logits(peft_model, ids))
    assert main(["jaxdistill", "export", str(tiny_chat_model), str(tmp_path / "none"), "--adapter"]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err
