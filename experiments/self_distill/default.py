"""Self-distillation with privileged information on SmolLM2-135M-Instruct and synthetic word problems.

    python -m jaxdistill train --config=experiments/self_distill/default.py
    python -m jaxdistill train --config=experiments/self_distill/default.py --config.arm=sft --config.seed=1
    python -m jaxdistill train --config=experiments/self_distill/default.py --config.data.source=jsonl \
        --config.data.train_path=gsm8k_train.jsonl --config.data.eval_path=gsm8k_test.jsonl
    python -m jaxdistill train --config=experiments/self_distill/default.py --config.data.source=tfds \
        --config.data.tfds_name=gsm8k --config.data.tfds_data_dir=~/tensorflow_datasets

The student answers from a plain CoT prompt; the same model with the reference solution as a
hint is the teacher; the target is (0.75 * teacher + student) / k with k matched to the
student's entropy; the loss is KL(target || student) on the student's own samples.
Arms: blend (default), fixed_k, teacher, sft, rejection_sft (SFT on the samples that reach
the answer); guided=True samples from the blend, rollout=teacher from pTeacher (off-policy).
Controls: hint=wrong (another problem's solution as the hint), hint=none (no hint: the loss
vanishes). docs/results.md runs every arm with `python experiments/self_distill/grid.py`.
Sized to run in under 20 minutes on a 2-core CPU.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m-instruct"
    c.dtype = "float32"  # parameters
    c.compute_dtype = ""  # "" = same as dtype; "bfloat16" for mixed precision
    c.remat = False  # what the backward keeps: False/none, True/full, dots, offload (jaxdistill.models.transformer)
    c.attention = "xla"  # xla (dense, CPU) | flash (blockwise, any backend) | cudnn (GPU) | splash (TPU)
    c.workdir = "runs/self_distill/default"
    c.seed = 0
    # "": a rerun continues this workdir only under the same results-changing settings (config.json holds them);
    # "ignore_config_changes": continue it anyway (more steps, say), recorded in the summary
    c.resume = ""
    # TensorBoard event files go to workdir/tensorboard/ always; wandb=PROJECT also logs to Weights & Biases
    c.log = dict(wandb="")
    c.arm = "blend"  # blend | fixed_k | teacher | sft | rejection_sft | stack
    c.hint = "reference"  # what pTeacher shows: reference | wrong (another problem's solution) | none
    c.rollout = "student"  # which context samples genCoT: student (on-policy) | teacher (pTeacher, off-policy)
    c.teacher_weight = 0.75
    c.fixed_k = 1.75  # used by arm=fixed_k
    # arm=stack: the frozen teacher stack (jaxdistill/teachers) as the target, in the student's vocabulary;
    # hint=True shows every teacher the reference solution, as the self-teacher sees it; fewshot_ends_turn=True
    # maps a few-shot teacher's end of reply (a blank line; a line break after '#### N') onto the end of turn.
    c.stack = ml_collections.ConfigDict(dict(
        teachers=[dict(name="smollm2-chat", model="smollm2-135m-instruct", style="chat"),
                  dict(name="smollm2-fewshot", model="smollm2-135m-instruct", style="fewshot"),
                  dict(name="gemma3-fewshot", model="gemma3-270m", style="fewshot")],
        hint=True, rule="mean_probs", top_k=10, record_top=20, width=2, fewshot_examples=2,
        fewshot_ends_turn=False))
    # Prompts: chat (the model's chat template) or fewshot (worked examples from the first training records,
    # for base models such as gemma3-270m; replies end at a blank line).
    c.prompts = ml_collections.ConfigDict(dict(style="chat", fewshot_examples=2))
    c.guided = False  # sample genCoT from the blended target instead of the student
    c.sft_weight = 0.0  # > 0 adds this multiple of the cross-entropy on the reference solutions to the loss
    # True: a frozen copy of the initial weights teaches (one more forward); with LoRA the base model teaches:
    # the adapters are off for the teacher rows of the one combined forward, and nothing is copied (OPSD's setup)
    c.frozen_teacher = False
    # LoRA (rank > 0): adapters on the `targets` projections (PEFT's names) train, the base weights stay frozen
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    c.combined_forward = True  # one forward over both contexts; False: teacher in a second, gradient-free one
    c.steps = 24
    c.batch_size = 4  # problems per update
    c.samples_per_problem = 1  # genCoT samples per problem (each a pair of rows in the update)
    c.sample = ml_collections.ConfigDict(dict(max_new_tokens=96, temperature=0.7, top_k=0, top_p=1.0))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=2, end_lr_fraction=0.1, weight_decay=0.0,
                                             b1=0.9, b2=0.95, clip_norm=1.0, accumulate=1))
    # kind: forward_kl | reverse_kl | jsd | sampled_reverse_kl; end_weight weighs the positions predicting a
    # sample's end token (0 leaves them out); normalize: token (mean over tokens) | sequence (over samples)
    c.loss = ml_collections.ConfigDict(dict(kind="forward_kl", jsd_beta=0.5, top_k=0, clip=0.0, end_weight=1.0,
                                            normalize="token", chunk=64))
    # Data: source synthetic (generated; train_size, steps, max_start, max_operand), conversations (generated
    # revisions under constraints: the non-verifiable case, scored by checks), jsonl (train_path,
    # eval_path: GSM8K, generic or conversation records) or tfds (tfds_name prepared in tfds_data_dir).
    # Records longer than max_tokens (0: the model's context) stop the run before it starts, or are
    # left out with a printed count when overlong="skip".
    c.data = ml_collections.ConfigDict(dict(source="synthetic", seed=0, train_size=2000, eval_size=64, steps=1,
                                            max_start=20, max_operand=12, train_path="", eval_path="",
                                            tfds_name="gsm8k", tfds_data_dir="", max_tokens=0, overlong="error"))
    c.eval = ml_collections.ConfigDict(dict(before=True, after=True, every=0, max_new_tokens=96, batch_size=32,
                                            mean_at_k=0))
    # `python -m jaxdistill compile` only: the longest prompt (with its hint) the compiled programs take;
    # a run pads to its own batch's longest instead.
    # target: the TPU topology or GPUs the presets are sized for ("" = name one with --target).
    c.compile = ml_collections.ConfigDict(dict(prompt_tokens=256, target=""))
    # resume_from=N restarts from checkpoint N (later ones are deleted); 0 resumes from the latest.
    c.checkpoint = ml_collections.ConfigDict(dict(every=8, keep=2, resume_from=0))
    # -1: all remaining devices. dcn: how many ways each axis crosses the slow network (TPU
    # slices, GPU nodes); e.g. data=4 with dcn.data=2 runs two data-parallel replicas per slice.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1)))
    # Multi-process (GPU clusters, TPU pods): num_processes=-1 lets JAX discover everything;
    # launch/ has the scripts. 1 = a single process, no jax.distributed. local_device_ids: "0,1,..." the
    # accelerators this process drives ("" = JAX's choice).
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0,
                                                   local_device_ids=""))
    return c
