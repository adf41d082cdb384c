"""Batches and the jitted train step of self-distillation (and of the SFT baseline).

Batch layout. Problem i has two adjacent rows: row 2i is the student context
[pad, pCoT_i, genCoT_i, pad] and row 2i+1 the teacher context [pad, pTeacher_i, genCoT_i, pad].
Prompts are left-padded to a shared width P, so genCoT_i sits in the same columns
P .. P+G-1 of both rows and positions count real tokens only. One forward over all 2B rows
scores genCoT under both contexts; the logits at columns P-1 .. P+G-2 predict the genCoT
tokens, and `target_mask` [B, G] marks which of them are real generated tokens.

Adjacent pairs keep each problem's two rows on the same device when the batch is sharded,
so every device differentiates its own student rows (`grad_rows_stride=2`) and none idles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdistill.distill.losses import LossConfig, TargetConfig, chunked_distill_loss


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def padded_widths(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  multiple: int = 32) -> tuple[int, int]:
    """(prompt width P, completion width G) of a batch: the longest of each, rounded up."""
    return round_up(max(len(p) for p in prompts), multiple), round_up(max(len(c) for c in completions), multiple)


def build_batch(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]] | None,
                completions: Sequence[Sequence[int]], *, pad_id: int, multiple: int = 32,
                end_ids: Sequence[int] = (), widths: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The aligned batch (see the module docstring). Without teacher prompts: student rows only (SFT).

    `end_mask` [B, G] marks the position that predicts a completion's last token when that token
    is one of `end_ids` (the sample ended there rather than at the length cap). `widths`
    (P, G) pads wider than this batch needs: processes of one run agree on them.
    """
    if teacher_prompts is None:
        prompts, per_problem = list(student_prompts), 1
    else:
        prompts, per_problem = [p for pair in zip(student_prompts, teacher_prompts, strict=True) for p in pair], 2
    if len(prompts) != per_problem * len(completions):
        raise ValueError(f"{len(prompts) // per_problem} prompts but {len(completions)} completions.")
    if any(len(c) == 0 for c in completions):
        raise ValueError("every completion needs at least one token.")
    width, gen = padded_widths(prompts, completions, multiple)
    if widths is not None:
        width, gen = max(width, widths[0]), max(gen, widths[1])
    rows = len(prompts)
    tokens = np.full((rows, width + gen), pad_id, np.int32)
    mask = np.zeros((rows, width + gen), bool)
    target_mask = np.zeros((len(completions), gen), bool)
    end_mask = np.zeros((len(completions), gen), bool)
    for r, prompt in enumerate(prompts):
        completion = completions[r // per_problem]
        tokens[r, width - len(prompt) : width] = prompt
        tokens[r, width : width + len(completion)] = completion
        mask[r, width - len(prompt) : width + len(completion)] = True
    for r, completion in enumerate(completions):
        target_mask[r, : len(completion)] = True
        end_mask[r, len(completion) - 1] = completion[-1] in end_ids
    return {"tokens": tokens, "mask": mask, "target_mask": target_mask, "end_mask": end_mask}


def split_contexts(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of a paired batch (or anything computed from it) -> (student rows, teacher rows)."""
    pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])  # a reshape, so sharded pairs stay local
    return pairs[:, 0], pairs[:, 1]


def completion_columns(batch) -> slice:
    """The columns whose logits predict the completion tokens (see the module docstring)."""
    gen = batch["target_mask"].shape[1]
    width = batch["tokens"].shape[1] - gen
    return slice(width - 1, width - 1 + gen)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    teacher_params: nnx.State | None = None  # a frozen teacher; None: the live weights teach
    # With LoRA: `params` are the adapters and this the base weights (no gradient, no optimizer
    # state, not in checkpoints: the run reloads them from its model).
    frozen_params: nnx.State | None = None

    def without_frozen(self) -> TrainState:
        """What a checkpoint holds: everything but the frozen base weights."""
        return dataclasses.replace(self, frozen_params=None)


def as_model(graphdef, params):
    """The model from a train state's parameters: one State, or (adapters, frozen base) under LoRA."""
    return nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)


def all_params(state: TrainState):
    """The parameters `as_model` takes: `params`, with the frozen base weights under LoRA."""
    return state.params if state.frozen_params is None else (state.params, state.frozen_params)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 2
    total_steps: int = 100
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    accumulate: int = 1  # micro-batches per update


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, c.lr, max(c.warmup_steps, 1), max(c.total_steps, 2),
                                                  end_value=c.lr * c.end_lr_fraction)
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm),
                     optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
    return optax.MultiSteps(tx, c.accumulate) if c.accumulate > 1 else tx


def init_state(model, tx, *, frozen_teacher: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """Train state around a model whose parameters are already placed (on a mesh or a device).

    Every leaf is created where its parameter lives: the moments and the frozen teacher's copy
    in their parameter's sharding, the step counter replicated on the parameters' mesh. A
    model of abstract parameters (ShapeDtypeStructs with shardings) gives the abstract state
    an ahead-of-time compile takes. A model with LoRA adapters (`models.lora.add_lora`) trains
    only them: they alone have optimizer state, and its frozen teacher is the base model (the
    adapters off), so no copy is made.
    The state takes the model's arrays as they are, and the jitted step donates them: after
    the first step the old `model` is gone. Rebuild it with as_model(graphdef, all_params(state)).
    """
    from jaxdistill import mesh as mesh_lib

    lora = getattr(model, "lora", None) is not None
    if lora:
        graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    else:
        (graphdef, params), frozen = nnx.split(model), None
    mesh = mesh_lib.mesh_of(params)
    shardings = jax.tree.map(lambda x: x.sharding, params) if mesh is not None else None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    make = jax.eval_shape if abstract else (lambda f, *args: f(*args))
    step = make(jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated))
    opt_state = make(jax.jit(tx.init, out_shardings=mesh_lib.optimizer_shardings(tx, params)), params)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
    teacher = make(copy, params) if frozen_teacher and not lora else None
    return graphdef, TrainState(step=step, params=params, opt_state=opt_state, teacher_params=teacher,
                                frozen_params=frozen)


KL_BUCKET = 16  # generated positions per bucket of the logged KL-by-position profile


def loss_weights(batch, loss: LossConfig) -> jax.Array:
    """Per-token weights [B, G] summing to 1: the mean over generated tokens (or over samples)."""
    m = batch["target_mask"].astype(jnp.float32)
    m = m * jnp.where(batch["end_mask"], loss.end_weight, 1.0)
    if loss.normalize == "sequence":
        rows = jnp.maximum(jnp.sum(jnp.any(batch["target_mask"], axis=1)), 1)
        return m / jnp.maximum(m.sum(axis=1, keepdims=True), 1e-9) / rows
    return m / jnp.maximum(m.sum(), 1e-9)


def distill_loss(graphdef, params, teacher_params, batch, target: TargetConfig, loss: LossConfig,
                 combined_forward: bool = True, dropout_key=None, base_teacher: bool = False):
    """The weighted per-token loss over generated tokens, and diagnostics.

    combined_forward (live teacher only): one forward over student and teacher rows, whose
    backward runs through the student rows only (`grad_rows_stride=2`). False runs the
    teacher as a second, gradient-free forward instead (needed for a frozen teacher).
    Diagnostics: token means of the per-token quantities; `kl_by_position`, the mean
    KL(target || student) per bucket of KL_BUCKET generated positions; and, per sample, the
    student's and the target's probability of the end token where the sample ended
    (`end_p_student`, `end_p_target`, 0 where it ran to the length cap).
    With LoRA: `dropout_key` drives the adapters' dropout on the student rows; `base_teacher`
    runs the teacher rows with the adapters off (the frozen base model teaches).
    """
    model = as_model(graphdef, params)
    tokens, mask, target_mask = batch["tokens"], batch["mask"], batch["target_mask"]
    region = completion_columns(batch)
    if teacher_params is None and combined_forward:
        hidden, _ = model.hidden_states(tokens, None, mask, grad_rows_stride=2, frozen_rows_base=base_teacher,
                                        dropout_key=dropout_key)  # teacher rows: no backward
        student_h, teacher_h = split_contexts(hidden[:, region])
    else:
        (student_tokens, teacher_tokens), (student_mask, teacher_mask) = split_contexts(tokens), split_contexts(mask)
        student_h = model.hidden_states(student_tokens, None, student_mask, dropout_key=dropout_key)[0][:, region]
        teacher = as_model(graphdef, jax.lax.stop_gradient(params if teacher_params is None else teacher_params))
        teacher_h = teacher.hidden_states(teacher_tokens, None, teacher_mask, base=base_teacher)[0][:, region]
    labels = split_contexts(tokens)[0][:, region.start + 1 : region.stop + 1]
    per_token = chunked_distill_loss(model.logits, student_h, jax.lax.stop_gradient(teacher_h), labels, target, loss)
    weights = loss_weights(batch, loss)
    value = jnp.sum(jnp.where(weights > 0, per_token.pop("loss") * weights, 0.0))
    m = target_mask.astype(jnp.float32)
    stats = {name: jnp.sum(v * m) / jnp.maximum(m.sum(), 1) for name, v in per_token.items()}
    buckets = -(-m.shape[1] // KL_BUCKET)
    by_bucket = lambda x: jnp.pad(x, ((0, 0), (0, buckets * KL_BUCKET - x.shape[1]))).reshape(  # noqa: E731
        x.shape[0], buckets, KL_BUCKET).sum(axis=(0, 2))
    stats["kl_by_position"] = by_bucket(per_token["kl_target_student"] * m) / jnp.maximum(by_bucket(m), 1)
    end = batch["end_mask"]
    stats["end_p_student"] = jnp.sum(jnp.where(end, jnp.exp(per_token["logp_student"]), 0.0), axis=1)
    stats["end_p_target"] = jnp.sum(jnp.where(end, jnp.exp(per_token["logp_target"]), 0.0), axis=1)
    return value, stats


def sft_loss(graphdef, params, teacher_params, batch, target=None, loss=None, combined_forward=True,
             dropout_key=None, base_teacher=False):
    """Cross-entropy on the completion tokens (the SFT baseline), in chunks of the same size."""
    model = as_model(graphdef, params)
    tokens, mask, target_mask = batch["tokens"], batch["mask"], batch["target_mask"]
    region = completion_columns(batch)
    hidden = model.hidden_states(tokens, None, mask, dropout_key=dropout_key)[0][:, region]
    labels = tokens[:, region.start + 1 : region.stop + 1]

    @jax.checkpoint
    def nll(h, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(model.logits(h)), y[..., None], axis=-1)[..., 0]

    per_token = jax.lax.map(lambda xs: nll(*xs), (hidden.swapaxes(0, 1), labels.swapaxes(0, 1))).swapaxes(0, 1)
    return jnp.sum(jnp.where(target_mask, per_token, 0.0)) / jnp.maximum(target_mask.sum(), 1), {}


def sparse_distill_loss(graphdef, params, teacher_params, batch, target=None, loss=None, combined_forward=True,
                        dropout_key=None, base_teacher=False):
    """KL(target || student) against a sparse target given in the batch (student rows only): at
    each completion position, `target_ids` [B, G, K] and `target_logprobs` [B, G, K], e.g. the
    teacher stack's aggregated top-K, renormalised over the K tokens. Diagnostics as in
    `distill_loss`: the student's and the target's probability of the end token where each
    sample ended (`end_p_student`, `end_p_target`)."""
    model = as_model(graphdef, params)
    tokens, mask, target_mask = batch["tokens"], batch["mask"], batch["target_mask"]
    region = completion_columns(batch)
    hidden = model.hidden_states(tokens, None, mask, dropout_key=dropout_key)[0][:, region]
    labels = tokens[:, region.start + 1 : region.stop + 1]
    log_t = jax.nn.log_softmax(batch["target_logprobs"].astype(jnp.float32), axis=-1)  # renormalise over K

    @jax.checkpoint
    def kl(h, ids, lt, label):
        log_s = jax.nn.log_softmax(model.logits(h))
        picked = jnp.take_along_axis(log_s, ids, axis=-1)
        known = jnp.isfinite(lt)  # -inf (a token outside the kept mass) or NaN (a padding position): weight 0
        p = jnp.where(known, jnp.exp(jnp.where(known, lt, 0.0)), 0.0)
        p_student = jnp.exp(jnp.take_along_axis(log_s, label[:, None], axis=-1)[:, 0])  # the sampled token's
        p_target = jnp.sum(jnp.where(ids == label[:, None], p, 0.0), axis=-1)
        return jnp.sum(p * (jnp.where(known, lt, 0.0) - picked), axis=-1), p_student, p_target

    swap = lambda x: x.swapaxes(0, 1)  # noqa: E731  (map over positions)
    per_token, p_student, p_target = (swap(x) for x in jax.lax.map(lambda xs: kl(*xs), (
        swap(hidden), swap(batch["target_ids"]), swap(log_t), swap(labels))))
    end = batch["end_mask"]
    stats = {"end_p_student": jnp.sum(jnp.where(end, p_student, 0.0), axis=1),
             "end_p_target": jnp.sum(jnp.where(end, p_target, 0.0), axis=1)}
    return jnp.sum(jnp.where(target_mask, per_token, 0.0)) / jnp.maximum(target_mask.sum(), 1), stats


def mode_for(arm: str) -> str:
    """Which loss an arm trains with: "distill" (paired rows), "sft" or "sparse" (a given target)."""
    return {"sft": "sft", "rejection_sft": "sft", "stack": "sparse"}.get(arm, "distill")


def make_train_step(graphdef, tx, *, mode: str = "distill", target: TargetConfig = TargetConfig(),
                    loss: LossConfig = LossConfig(), combined_forward: bool = True, sft_weight: float = 0.0,
                    base_teacher: bool = False):
    """A pure `(state, batch, rng) -> (state, metrics)`; jit it with `jit_train_step`.

    sft_weight > 0 adds that multiple of the cross-entropy on `batch["sft"]` (student prompts
    and reference completions, a `build_batch` without teacher prompts) to the loss.
    `base_teacher` (LoRA): the teacher rows run with the adapters off. `rng` drives the
    adapters' dropout (the step is otherwise deterministic)."""
    loss_fn = {"distill": distill_loss, "sft": sft_loss, "sparse": sparse_distill_loss}[mode]

    def train_step(state: TrainState, batch, rng):
        def objective(params):
            full = params if state.frozen_params is None else (params, state.frozen_params)
            value, stats = loss_fn(graphdef, full, state.teacher_params, batch, target, loss, combined_forward,
                                   dropout_key=jax.random.fold_in(rng, 0), base_teacher=base_teacher)
            if sft_weight:
                sft_value, _ = sft_loss(graphdef, full, None, batch["sft"], dropout_key=jax.random.fold_in(rng, 1))
                value, stats = value + sft_weight * sft_value, stats | {"sft_loss": sft_value}
            return value, stats

        (value, stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), **stats,
                   "generated_tokens": batch["target_mask"].sum()}
        return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step, state: TrainState, mesh=None, sparse_target: bool = False, sft_rows: bool = False):
    """jit with explicit shardings (state as it is placed, batch split over data/fsdp) and donation.
    `sparse_target`: the batch also holds target_ids/target_logprobs (mode "sparse"); `sft_rows`:
    it also holds an SFT batch under "sft" (sft_weight > 0)."""
    from jaxdistill import mesh as mesh_lib

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    rows = {name: mesh_lib.batch_sharding(mesh, 2) for name in ("tokens", "mask", "target_mask", "end_mask")}
    batch_shardings = dict(rows)
    if sparse_target:
        batch_shardings |= {name: mesh_lib.batch_sharding(mesh, 3) for name in ("target_ids", "target_logprobs")}
    if sft_rows:
        batch_shardings["sft"] = rows  # a build_batch of its own, laid out like the main one
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
