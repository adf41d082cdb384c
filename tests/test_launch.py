"""The launch path, where it can run here: setup and launch scripts in dry-run mode, and the
pod presets' memory arithmetic on abstract meshes of their real size."""

import ast
import importlib.util
import os
import subprocess
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from jaxdistill import main as main_lib
from jaxdistill import mesh as mesh_lib
from jaxdistill.distill import train as train_lib
from jaxdistill.errors import ConfigError
from jaxdistill.models.config import ModelConfig
from jaxdistill.models.transformer import Decoder

ROOT = Path(__file__).resolve().parents[1]
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=False,
                hidden_act="silu")  # Qwen3-8B's config.json, the fields we read
QWEN3_1P7B = QWEN3_8B | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                             tie_word_embeddings=True)  # Qwen3-1.7B's


def script(*args, env=None):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def experiment(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments/self_distill" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset(name):
    return experiment(name).get_config()


@pytest.mark.parametrize("accelerator,build", [("gpu", "jax[cuda12]<0.11.1"), ("tpu", "jax[tpu]<0.11.1")])
def test_setup_installs_the_accelerator_build_inside_the_venv(accelerator, build):
    out = script("scripts/setup.sh", "--dry-run", "--accelerator", accelerator)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == f".venv/bin/python -m pip install -q {build}"
    installs = [line for line in lines if " -m venv .venv" not in line]  # .venv is made first where missing
    assert all(line.startswith(".venv/bin/python -m pip") for line in installs)  # never the system Python
    assert ".venv/bin/python -m pip install -q -e ." in lines
    cpu = script("scripts/setup.sh", "--dry-run").stdout
    assert "jax[" not in cpu


def test_setup_refuses_unknown_options():
    out = script("scripts/setup.sh", "--accelerator", "xpu")
    assert out.returncode == 2 and "must be cpu, gpu or tpu" in out.stderr
    assert script("scripts/setup.sh", "--fast").returncode == 2


def test_slurm_script_gives_one_process_every_gpu_of_its_node_and_keeps_the_presets_mesh():
    out = script("launch/slurm_gpu.sh", "--dry-run", "experiments/self_distill/qwen3_8b_gpu8.py",
                 "--config.model=/data/Qwen3-8B", env={"SLURM_GPUS_ON_NODE": "8"})
    assert out.returncode == 0, out.stderr
    command = out.stdout.split()
    assert command[:2] == ["srun", "--ntasks-per-node=1"]
    assert "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7" in command
    assert "--config.distributed.num_processes=-1" in command and "--config.model=/data/Qwen3-8B" in command
    assert not any(arg.startswith("--config.mesh") for arg in command)
    missing = script("launch/slurm_gpu.sh", "--dry-run", "x.py", env={"SLURM_GPUS_ON_NODE": "0"})
    assert missing.returncode == 1 and "--gpus-per-node" in missing.stderr


def test_tpu_script_sets_up_the_tpu_build_on_every_worker_and_quotes_overrides():
    out = script("launch/tpu_pod.sh", "--dry-run", "my-tpu", "us-east5-a", "experiments/self_distill/qwen3_8b_v5p64.py",
                 "--config.workdir=/mnt/runs/a b")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --worker=all --command=")
    remote = out.stdout.split("--command=", 1)[1]
    assert "bash scripts/setup.sh --accelerator tpu &&" in remote
    assert "--config.distributed.num_processes=-1" in remote and r"--config.workdir=/mnt/runs/a\ b" in remote
    assert "--config.mesh" not in remote
    assert script("launch/tpu_pod.sh", "--dry-run", "only-a-name").returncode != 0


@pytest.mark.parametrize("name,hf,params,devices,state_gb", [("qwen3_8b_gpu8", QWEN3_8B, 8.19e9, 8, 8.19),
                                                           ("qwen3_8b_v5p64", QWEN3_8B, 8.19e9, 32, 2.05),
                                                           ("qwen3_1p7b_gpu1", QWEN3_1P7B, 1.72e9, 1, 13.8)])
def test_gpu_and_pod_presets_fit_their_mesh_with_the_state_their_docstrings_state(name, hf, params, devices,
                                                                                  state_gb):
    c = preset(name)
    with pytest.raises(ConfigError, match="--config.model"):
        train_lib.validate(c)  # the weights are the user's
    c.model = "/data/Qwen3"
    train_lib.validate(c)
    sizes = {axis: size for axis, size in dict(c.mesh).items() if axis != "dcn"}
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == devices
    assert (c.batch_size * c.samples_per_problem) % (sizes["data"] * sizes["fsdp"]) == 0
    config = ModelConfig.from_hf(hf)
    assert config.num_params() == pytest.approx(params, rel=1e-3)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)))
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    # parameters, gradients and two AdamW moments, all in the parameters' dtype
    assert 4 * mesh_lib.bytes_per_device(abstract, mesh) / 1e9 == pytest.approx(state_gb, rel=0.01)


def test_bytes_per_device_counts_replicated_dimensions_whole():
    config = ModelConfig.from_hf(QWEN3_8B)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)))
    one = mesh_lib.bytes_per_device(abstract, AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor")))
    assert one == 2 * config.num_params()
    replicated = mesh_lib.bytes_per_device(abstract, AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor")))
    assert replicated == one  # data parallelism replicates the parameters


GRID_ARMS = experiment("grid").ARMS


@pytest.mark.parametrize("arm", list(GRID_ARMS))
def test_every_grid_arm_overrides_real_keys_with_valid_values(arm):
    # A typo in an arm's overrides would otherwise surface only when its run starts, minutes into a grid.
    config = preset("default")
    overrides = GRID_ARMS[arm][1]
    # the CLI's own key check (update_from_flattened_dict would add an unknown key, not refuse it)
    main_lib._check_override_keys([f"--config.{o}" for o in overrides], config, "experiments/self_distill/default.py")
    for override in overrides:
        key, value = override.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a bare word: a string
            pass
        config.update_from_flattened_dict({key: value})  # TypeError on a value of the wrong type
    train_lib.validate(config)
