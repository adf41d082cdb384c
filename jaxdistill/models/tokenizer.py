"""Tokenizers and chat templates from transformers, for GGUF files and HF directories.

Nothing here needs torch: GGUF tokenizers are rebuilt from the file's metadata with
transformers' converter pieces (its own GGUF file reader imports torch).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Gemma 3 GGUF files ship without a chat template; this is Gemma 3's (text turns only).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
FALLBACK_CHAT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE}
# Tokens that end an assistant turn, besides the tokenizer's own EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


def cache_dir() -> Path:
    return Path(os.environ.get("JAXDISTILL_CACHE", Path.home() / ".cache" / "jaxdistill"))


@dataclasses.dataclass
class Tokenizer:
    """A transformers tokenizer plus what generation needs: stop ids and a pad id."""

    hf: object  # transformers.PreTrainedTokenizerBase
    eos_ids: tuple[int, ...]  # every id that ends generation
    pad_id: int
    turn_end_id: int  # the id that closes an assistant turn (<|im_end|>, <end_of_turn>, ...; else EOS)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def newline_ids(self) -> tuple[int, ...]:
        """Every token whose text holds a newline (to stop generation at the end of a line)."""
        pieces = self.hf.batch_decode([[i] for i in range(self.vocab_size)])
        return tuple(i for i, piece in enumerate(pieces) if "\n" in piece)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the model's own chat template."""
        # The template writes BOS itself where the model wants one.
        return self.encode(self.chat_text(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)

    def chat_text(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        if not self.hf.chat_template:
            raise ValueError("this tokenizer has no chat template; pass raw prompts instead of messages.")
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _file_key(path: Path) -> str:
    """A cheap identity for a large file: size, and hashes of its head and tail."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(path.stat().st_size - (1 << 20), 0))
        h.update(f.read())
    return h.hexdigest()[:16]


def gguf_tokenizer(fields: Mapping[str, object]):
    """A transformers fast tokenizer built from a GGUF file's metadata, without torch.

    `fields` maps metadata keys to `gguf.ReaderField`s (a `GGUFReader`'s `fields`). The
    vocabulary, merges and special tokens are regrouped as transformers' own GGUF loader
    does and handed to its torch-free converter; only its file reader needs torch.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    def value(key):
        return fields[key].contents() if key in fields else None

    arch = value("general.architecture")
    groups = {group: {name: value(f"tokenizer.{key}") for key, name in renames.items()
                      if f"tokenizer.{key}" in fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocabulary, settings = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in vocabulary:
        raise ValueError("this GGUF file holds no tokenizer (no tokenizer.ggml.tokens); load the model from a "
                         "Hugging Face directory with its tokenizer files instead.")
    if vocabulary.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        settings.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = value(f"tokenizer.ggml.{key}")
        settings[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(arch, vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **extra)


def load_tokenizer(path: Path, *, arch: str, gguf_fields: Callable[[], Mapping[str, object]] | None = None
                   ) -> Tokenizer:
    """Tokenizer of an HF directory, or of a GGUF file (built from its metadata, then cached).

    `gguf_fields` returns the file's metadata fields when the cache misses (so a caller
    that already parsed the file does not parse it again). The cache under
    `JAXDISTILL_CACHE` only saves time: an unwritable cache is skipped.
    """
    from transformers import AutoTokenizer

    if path.is_dir():
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise FileNotFoundError(
                f"{path} has no tokenizer files (tokenizer.json or tokenizer.model with tokenizer_config.json); "
                "copy them from the original model directory."
            )
        hf = AutoTokenizer.from_pretrained(path)
    else:
        cached = cache_dir() / "tokenizers" / f"{path.stem}-{_file_key(path)}"
        if (cached / "tokenizer_config.json").exists():
            hf = AutoTokenizer.from_pretrained(cached)
        else:
            hf = gguf_tokenizer(gguf_fields() if gguf_fields else _read_gguf_fields(path))
            _save_atomically(hf, cached)
    if not hf.chat_template and arch in FALLBACK_CHAT_TEMPLATES:
        hf.chat_template = FALLBACK_CHAT_TEMPLATES[arch]
    vocab = hf.get_vocab()
    turn_ends = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    eos = {hf.eos_token_id, *turn_ends} - {None}
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    return Tokenizer(hf=hf, eos_ids=tuple(sorted(eos)), pad_id=int(pad),
                     turn_end_id=int(turn_ends[0] if turn_ends else hf.eos_token_id))


def _read_gguf_fields(path: Path) -> Mapping[str, object]:
    import gguf

    return gguf.GGUFReader(path).fields


def _save_atomically(hf, target: Path) -> None:
    """Write the tokenizer to `target` in one rename; skipped (with a note) when the cache is unwritable."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
    except OSError as e:
        log.warning("tokenizer cache %s is not writable (%s); the tokenizer is rebuilt on each load", target, e)
        return
    hf.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: readers never see a half-written directory
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
