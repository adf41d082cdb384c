"""Tokenizers rebuilt from GGUF metadata without torch equal transformers' own GGUF loader."""

import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jaxdistill.models import loading
from jaxdistill.models.tokenizer import FALLBACK_CHAT_TEMPLATES, load_tokenizer

TEXTS = [
    "Hello world!",
    "  two leading spaces,\ttabs\tand\n\nblank lines\n",
    "Ünïcödé: 日本語のテキスト, emoji 🙂🚀, Greek αβγ, Arabic مرحبا",
    "Mia has 12 apples. 12 x 3 = 36.\n#### 36",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # code",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn>model\n<end_of_turn>",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.mark.parametrize("name,arch", [("smollm2-135m-instruct", "llama"), ("gemma3-270m", "gemma3")])
def test_tokenizer_from_gguf_metadata_equals_transformers(name, arch, tmp_path, monkeypatch, gguf_parsed_once):
    path = loading.resolve(name)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # transformers' path (needs torch)
    if not reference.chat_template:
        reference.chat_template = FALLBACK_CHAT_TEMPLATES[arch]
    monkeypatch.setenv("JAXDISTILL_CACHE", str(tmp_path))
    built = load_tokenizer(path, arch=arch)  # empty cache: converted from the metadata
    cached = load_tokenizer(path, arch=arch)  # read back from the cache it wrote
    assert list((tmp_path / "tokenizers").iterdir()), "the conversion was not cached"
    for tokenizer in (built, cached):
        assert len(tokenizer.hf) == len(reference)
        for text in TEXTS:
            for special in (True, False):
                expected = reference(text, add_special_tokens=special)["input_ids"]
                assert tokenizer.encode(text, add_special_tokens=special) == expected, (text, special)
            ids = reference(text)["input_ids"]
            assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        messages = CONVERSATION if arch == "llama" else CONVERSATION[1:]
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.chat_text(messages) == expected
        assert tokenizer.eos_ids and reference.eos_token_id in tokenizer.eos_ids


def test_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("JAXDISTILL_CACHE", str(blocked))
    tokenizer = load_tokenizer(loading.resolve("smollm2-135m-instruct"), arch="llama")
    assert tokenizer.decode(tokenizer.encode("two apples")) == "two apples"


def test_models_load_and_chat_without_torch(tmp_path):
    """The environment of `scripts/setup.sh` has no torch: loading and sampling must not need it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from jaxdistill import models, sampling\n"
        "for name in ('smollm2-135m-instruct', 'gemma3-270m'):\n"
        "    model, tok = models.load(name)\n"
        "    print(name, repr(sampling.chat(model, tok, 'Say hi.', max_new_tokens=4)[0]))\n"
    )
    env = {**os.environ, "JAXDISTILL_CACHE": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smollm2-135m-instruct" in result.stdout and "gemma3-270m" in result.stdout
