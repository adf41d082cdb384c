"""Dynamic ensemble router on the offline models and synthetic mixed tasks.

    python -m jaxdistill route --config=experiments/router/default.py
    python -m jaxdistill route --config=experiments/router/default.py --config.env.alpha=0.3 --config.seeds=5

Three experts (SmolLM2-135M-Instruct in chat and few-shot form, Gemma 3 270M few-shot) on
four task families with different metrics. Every path of up to T_max calls is precomputed
(resumable, in workdir/precompute), then PPO trains the router for every alpha of the sweep
and every seed in one jitted call, and the router is compared with the baselines on held-out
questions. About 18 minutes on a 2-core CPU: precompute (2304 expert calls) ~8, PPO for
6 alphas x 5 seeds ~6, evaluation and loading the rest.
"""

import ml_collections

from jaxdistill.router.experts import DEFAULT_KTP


def expert(name, model, style, **kw):
    return dict(name=name, model=model, style=style, **kw)


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "runs/router/default"
    c.seed = 0
    # "": a rerun continues this workdir only under the same results-changing settings (config.json holds them);
    # "ignore_config_changes": continue it anyway (more steps, say), recorded in the summary
    c.resume = ""
    # TensorBoard event files go to workdir/tensorboard/ always; wandb=PROJECT also logs to Weights & Biases
    c.log = dict(wandb="")
    c.seeds = 5  # PPO seeds per alpha, trained at once with vmap

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | jsonl | tfds
    c.data.dataset = ""  # jsonl/tfds: boolq | gsm8k | squad | hotpotqa | xsum | cnn_dailymail | sst2
    c.data.train_path = ""
    c.data.test_path = ""
    c.data.tfds_data_dir = ""
    c.data.test_split = "validation"
    c.data.metric = ""  # "" = the dataset's own metric
    c.data.train_size = 128
    c.data.test_size = 64
    c.data.seed = 0

    c.experts = [
        expert("smollm2-chat", "smollm2-135m-instruct", "chat", system="Answer the question briefly.",
               max_new_tokens=24),
        expert("smollm2-fewshot", "smollm2-135m-instruct", "fewshot", max_new_tokens=8),
        expert("gemma3-fewshot", "gemma3-270m", "fewshot", max_new_tokens=8),
    ]
    c.ktp_template = DEFAULT_KTP
    # False: each call answers the question alone (the no-KTP ablation; derived from the first calls)
    c.knowledge_transfer = True
    c.encoder = "smollm2-135m-instruct"  # state embeddings: mean-pooled hidden states
    c.metric_encoder = ""  # set to a model to enable the 'embedding' quality metric

    c.precompute = ml_collections.ConfigDict()
    c.precompute.t_max = 2  # 3 works too: 39 calls per question instead of 12
    c.precompute.dir = ""  # "" = workdir/precompute; share one precompute between runs that sweep env/PPO settings
    c.precompute.chunk = 256  # (question, parent) pairs per resumable unit
    c.precompute.batch_size = 64
    c.precompute.host = 0
    c.precompute.num_hosts = 1

    c.env = ml_collections.ConfigDict()
    c.env.alpha = 0.1
    c.env.beta = 0.5
    c.env.gamma = 0.5
    c.env.p0 = 0.9
    c.env.cost_scale = "mean"  # "mean" FLOPs of one call, or a number of FLOPs
    c.alphas = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]

    c.ppo = ml_collections.ConfigDict(dict(
        num_envs=64, num_steps=16, total_timesteps=200_000, update_epochs=4, num_minibatches=4, discount=0.99,
        gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, lr=3e-4, anneal_lr=True,
        hidden=(128, 128)))
    c.knn_k = 5
    return c
