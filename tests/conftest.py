"""Shared fixtures. JAX gets 8 fake CPU devices (set before it starts) for sharding tests;
everything else runs on device 0 as usual."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (test extras, for TPU compiles) must not change CPU runs
# pytest-xdist workers each load libtpu to compile for TPU topologies; without this the second
# one fails on libtpu's one-process-per-host lock file (no TPU is ever opened here).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One XLA compilation cache for this test run, shared by the pytest-xdist workers and every
# subprocess a test starts (they inherit the variable): the CLI runs on tiny models compile the
# same programs again and again. It starts empty and the run deletes it at the end.
_OWN_COMPILE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILE_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdistill-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))  # a size turns on jax's file lock

import pytest  # noqa: E402

# With pytest-xdist (`-n 2 --dist loadgroup`): each test file is one unit of work, so its module
# fixtures load once; files that share an expensive session fixture share a worker (the router
# notebook reads the `route_run` the router tests make; the tokenizer tests reuse the GGUF files
# the parity tests parsed: gguf_parsed_once); the heaviest files start first, so the
# two workers finish together.
SHARES_A_WORKER_WITH = {"test_colabs": "test_router", "test_tokenizer": "test_parity"}
HEAVIEST_FIRST = ("test_teachers", "test_distill", "test_router", "test_hostile_input", "test_lora", "test_parity",
                  "test_pruning", "test_compile", "test_tokenizer", "test_multihost")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    def group(item):
        module = item.module.__name__.rsplit(".", 1)[-1]
        return SHARES_A_WORKER_WITH.get(module, module)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: a file's tests keep their order


def pytest_sessionfinish(session):
    if _OWN_COMPILE_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):  # the process that made it
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _hf_reference(path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module compiles its own programs (models, train steps, samplers); dropping them
    after the module keeps the whole suite's memory flat (it grew past 24 GiB without this)."""
    yield
    import ctypes
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    try:  # hand freed heap pages back to the OS (glibc keeps them otherwise)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@pytest.fixture(scope="session")
def smollm2():
    from jaxdistill.models import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    from jaxdistill.models import load

    return load("gemma3-270m")


@pytest.fixture(scope="session")
def gguf_parsed_once():
    """transformers parses a GGUF file's metadata once for the config, again for the weights and
    again for a tokenizer; for Gemma 3's 262k-token vocabulary each parse takes 15-20 s in the gguf
    package's Python reader. With this fixture a file is parsed once per test process (keyed by
    path, size and mtime, so a rewritten file is parsed again)."""
    import gguf

    readers, parse = {}, gguf.GGUFReader

    def reader(path, mode="r"):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield


@pytest.fixture(scope="session")
def hf_reference(gguf_parsed_once):
    """name -> transformers PyTorch model on the same weights (built once per session)."""
    from jaxdistill.models.loading import resolve

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _hf_reference(resolve(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def route_run(tmp_path_factory):
    """A small finished `route` run on two SmolLM2 experts: (config, results). The end-to-end
    test checks it; the router notebook reads it instead of making its own."""
    import importlib.util
    from pathlib import Path

    from jaxdistill.router.run import run

    spec = importlib.util.spec_from_file_location("router_default",
                                                  Path(__file__).parent.parent / "experiments/router/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir = str(tmp_path_factory.mktemp("route-run") / "route")
    c.data.train_size, c.data.test_size = 8, 4
    c.experts = [dict(name="chat", model="smollm2-135m-instruct", style="chat", max_new_tokens=4),
                 dict(name="fewshot", model="smollm2-135m-instruct", style="fewshot", max_new_tokens=4)]
    c.precompute.t_max = 2
    c.alphas = [0.0, 0.5]
    c.seeds = 3
    c.knn_k = 3
    c.ppo.update(num_envs=16, num_steps=8, total_timesteps=16 * 8 * 10, hidden=(16,))
    return c, run(c)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from jaxdistill.models.loading import describe

    path = tmp_path_factory.mktemp("tiny-chat")
    _, tokenizer = describe("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=tokenizer.hf.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.hf.bos_token_id, eos_token_id=tokenizer.turn_end_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_smollm2(tiny_chat_model):
    """(model, tokenizer): SmolLM2's tokenizer on `tiny_chat_model`'s 2-layer random weights."""
    from jaxdistill.models import load

    return load(tiny_chat_model)


@pytest.fixture(scope="session")
def tiny_gemma3():
    """(model, tokenizer): Gemma 3's tokenizer (262k tokens) and architecture (local and global layers,
    q/k norms, sandwich norms) on 2 small random layers. The stack's machinery (alignment, lockstep
    decoding, scoring) is checked on these: it needs two real vocabularies, not trained weights."""
    import dataclasses

    from flax import nnx

    from jaxdistill.models.loading import describe
    from jaxdistill.models.transformer import Decoder

    config, tokenizer = describe("gemma3-270m")
    small = dataclasses.replace(config, d_model=64, d_ff=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                                layer_is_local=(True, False))
    return Decoder(small, rngs=nnx.Rngs(0)), tokenizer


@pytest.fixture(scope="session")
def tiny_gemma_model(tmp_path_factory, tiny_gemma3):
    """`tiny_gemma3` as a Hugging Face directory (written by our export), for runs that load by path."""
    from jaxdistill.models.export import save_hf

    path = tmp_path_factory.mktemp("tiny-gemma") / "model"
    save_hf(*tiny_gemma3, path)
    return path
