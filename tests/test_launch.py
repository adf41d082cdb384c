"""The launch path, where it can run here: setup and launch scripts in dry-run mode (which compile
the job for its target), and the pod presets' compiled memory records."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdistill import main as main_lib
from jaxdistill.distill import train as train_lib
from jaxdistill.errors import ConfigError
from jaxdistill.models.config import SHAPES, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import scale_table  # noqa: E402


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
                 "--config.model=qwen3-8b", env={"SLURM_GPUS_ON_NODE": "8"})
    command = out.stdout.splitlines()[0].split()
    assert command[:2] == ["srun", "--ntasks-per-node=1"]
    assert "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7" in command
    assert "--config.distributed.num_processes=-1" in command and "--config.model=qwen3-8b" in command
    assert not any(arg.startswith("--config.mesh") for arg in command)
    # then the dry run compiles the job for the preset's h100:8, which needs jax's CUDA build here
    if out.returncode == 0:
        assert "every program fits on h100:8" in out.stdout
    else:
        assert out.returncode == 2 and "--accelerator gpu" in out.stderr, out.stderr
    missing = script("launch/slurm_gpu.sh", "--dry-run", "x.py", env={"SLURM_GPUS_ON_NODE": "0"})
    assert missing.returncode == 1 and "--gpus-per-node" in missing.stderr


def test_tpu_script_sets_up_every_worker_quotes_overrides_and_compiles_for_its_topology(tmp_path):
    tiny = tmp_path / "tiny model"  # only config.json: the dry run's compile needs no weights
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps(dict(
        model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=True)))
    out = script("launch/tpu_pod.sh", "--dry-run", "my-tpu", "us-east5-a", "experiments/self_distill/qwen3_8b_v5p64.py",
                 f"--config.workdir={tmp_path}/a b", f"--config.model={tiny}", "--config.compile.prompt_tokens=64",
                 "--config.sample.max_new_tokens=64", "--config.eval.max_new_tokens=64")
    assert out.returncode == 0, out.stderr[-3000:]
    launch, *compiled = out.stdout.splitlines()
    assert launch.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --worker=all --command=")
    remote = launch.split("--command=", 1)[1]
    assert "bash scripts/setup.sh --accelerator tpu &&" in remote
    assert "--config.distributed.num_processes=-1" in remote and rf"--config.workdir={tmp_path}/a\ b" in remote
    assert "--config.mesh" not in remote
    assert "compiling for v5p:4x4x2 (32 x TPU v5" in compiled[0] and "every program fits on v5p:4x4x2" in compiled[-1]
    assert json.loads((tmp_path / "a b" / "compile-v5p_4x4x2.json").read_text())["devices"] == 32
    assert script("launch/tpu_pod.sh", "--dry-run", "only-a-name").returncode != 0


@pytest.mark.parametrize("name", list(scale_table.PRESETS))
def test_every_pod_preset_has_a_compiled_record_that_fits_its_target(name):
    """The presets' memory is the compiled programs' (docs/scale.md, from scripts/scale_table.py):
    each shipped preset has a record for its own target and lengths, and every program fits."""
    c = preset(name)
    with pytest.raises(ConfigError, match="--config.model"):
        train_lib.validate(c)  # the weights are the user's
    c.model = "/data/Qwen3"
    train_lib.validate(c)
    sizes = {axis: size for axis, size in dict(c.mesh).items() if axis != "dcn"}
    assert (c.batch_size * c.samples_per_problem) % (sizes["data"] * sizes["fsdp"]) == 0
    record = json.loads(scale_table.record_path(name, "shipped").read_text())
    assert record["target"] == c.compile.target and record["devices"] == sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    assert record["command"] == " ".join(["python", *scale_table.command(name, "shipped", "", Path())[1:-1]])
    names = {p["program"] for p in record["programs"]}
    assert {"train_step", "rollout_prefill", "rollout_decode", "eval_prefill", "eval_decode", "eval_score"} <= names
    assert all(p["fits"] and p["headroom"] >= 0.10 for p in record["programs"]), record["programs"]


@pytest.mark.parametrize("name,params", [("qwen3-1.7b", 1.72e9), ("qwen3-8b", 8.19e9), ("qwen3-32b", 32.76e9),
                                         ("llama3-70b", 70.55e9)])
def test_shape_names_are_the_published_architectures(name, params):
    assert ModelConfig.from_hf(SHAPES[name]).num_params() == pytest.approx(params, rel=1e-3)


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
