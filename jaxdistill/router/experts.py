"""The expert pool, the Knowledge Transfer Prompt and the fixed state encoder.

An expert is a model plus a prompt style plus decoding settings. Experts that share a
model share its weights (each model is loaded once). A call answers a batch of questions,
each optionally with the previous answer framed by the Knowledge Transfer Prompt (KTP),
and reports its cost in FLOPs, 2 x parameters x tokens processed (prompt, KTP context and
generated tokens, counted per call from the actual token counts).

Styles:
- "chat": the model's chat template, with an optional system message;
- "fewshot": plain completion after a few-shot block of "Q: ...\\nA: ..." lines (for base
  models such as Gemma 3 270M); the answer ends at the first newline.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxdistill import sampling
from jaxdistill.models import load

DEFAULT_KTP = (
    "{question}\n\nAnother student answered: \"{previous}\"\n"
    "Use that answer only as advice and give a better answer. Do not mention other students."
)
# Few-shot experts see the previous answer inline, and one example shows the format.
DEFAULT_FEWSHOT_KTP = "{question} (Another student answered \"{previous}\"; use it only as advice.)"
DEFAULT_FEWSHOT = (
    "Q: What is 3 times 7?\nA: 21\n"
    "Q: What is 4 times 6? (Another student answered \"20\"; use it only as advice.)\nA: 24\n"
    "Q: Is 18 larger than 42? Answer yes or no.\nA: no\n"
    "Q: Ali is a cook who lives in Paris. In which city does Ali live?\nA: Paris\n"
    "Q: Review: \"The song was dull.\" Is this review positive or negative?\nA: negative\n"
)
STYLES = ("chat", "fewshot")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    name: str
    model: str  # a built-in name, a .gguf file or a Hugging Face directory
    style: str = "chat"
    system: str = ""  # chat style: optional system message
    fewshot: str = DEFAULT_FEWSHOT  # fewshot style: the examples before "Q: <question>\nA:"
    ktp_template: str = ""  # "" = the pool's template (chat) or DEFAULT_FEWSHOT_KTP (fewshot)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"expert {self.name!r}: style {self.style!r} is not one of {STYLES}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"expert {self.name!r}: max_new_tokens must be >= 1.")

    @classmethod
    def from_config(cls, c) -> ExpertConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(c) - fields
        if unknown:
            raise ValueError(f"expert config has unknown keys {sorted(unknown)}; known: {sorted(fields)}.")
        return cls(**dict(c))


def knowledge_transfer(question: str, previous: str, template: str = DEFAULT_KTP) -> str:
    """The question with the previous answer framed as another student's advice."""
    return template.format(question=question, previous=previous.strip())


def parameter_count(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


class ExpertPool:
    """Loads each distinct model once; `call(i, questions, previous)` runs expert i."""

    def __init__(self, experts: Sequence[ExpertConfig], *, ktp_template: str = DEFAULT_KTP,
                 batch_size: int = 64, dtype: str = "float32", loaded: dict | None = None):
        """`loaded`: already loaded {model name: (model, tokenizer)} to reuse instead of loading."""
        if len(experts) < 1:
            raise ValueError("the expert pool is empty: configure at least one expert.")
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}.")
        for template in [ktp_template] + [e.ktp_template for e in experts if e.ktp_template]:
            for field in ("{question}", "{previous}"):
                if field not in template:
                    raise ValueError(f"a Knowledge Transfer Prompt template needs a {field} field: {template!r}.")
        self.experts = tuple(experts)
        self.ktp_template = ktp_template
        self.batch_size = batch_size
        loaded = loaded or {}
        self.models = {e.model: loaded.get(e.model) or load(e.model, dtype=dtype) for e in experts}
        self.parameters = {name: parameter_count(model) for name, (model, _) in self.models.items()}

    def __len__(self) -> int:
        return len(self.experts)

    def ktp_for(self, expert: ExpertConfig) -> str:
        if expert.ktp_template:
            return expert.ktp_template
        return DEFAULT_FEWSHOT_KTP if expert.style == "fewshot" else self.ktp_template

    def prompt(self, i: int, question: str, previous: str | None) -> list[int]:
        expert, (_, tokenizer) = self.experts[i], self.models[self.experts[i].model]
        text = question if previous is None else knowledge_transfer(question, previous, self.ktp_for(expert))
        if expert.style == "fewshot":
            return tokenizer.encode(f"{expert.fewshot}Q: {text}\nA:")
        system = [{"role": "system", "content": expert.system}] if expert.system else []
        return tokenizer.chat(system + [{"role": "user", "content": text}])

    def call(self, i: int, questions: Sequence[str], previous: Sequence[str | None], seed: int = 0,
             ) -> tuple[list[str], np.ndarray]:
        """Answers of expert i and the FLOPs of each call."""
        expert = self.experts[i]
        model, tokenizer = self.models[expert.model]
        stops = list(tokenizer.eos_ids) + (list(tokenizer.newline_ids) if expert.style == "fewshot" else [])
        rule = sampling.rule_from_config(expert.temperature, 0, expert.top_p)
        answers, flops = [], []
        for start in range(0, len(questions), self.batch_size):
            prompts = [self.prompt(i, q, p) for q, p in zip(questions[start:start + self.batch_size],
                                                            previous[start:start + self.batch_size], strict=True)]
            out = sampling.generate(model, prompts, max_new_tokens=expert.max_new_tokens, rule=rule,
                                    rng=jax.random.fold_in(jax.random.key(seed), start), eos_ids=stops,
                                    pad_id=tokenizer.pad_id)
            for prompt, sequence in zip(prompts, out.sequences(), strict=True):
                text = tokenizer.decode(sequence).strip()
                answers.append(text.split("\n")[0].strip() if expert.style == "fewshot" else text)
                flops.append(2.0 * self.parameters[expert.model] * (len(prompt) + len(sequence)))
        return answers, np.asarray(flops, np.float64)


class Encoder:
    """Fixed text encoder: mean-pooled final hidden states of one of our JAX models."""

    def __init__(self, model, *, batch_size: int = 64, max_tokens: int = 512, dtype: str = "float32"):
        """`model`: a name or path to load, or an already loaded (model, tokenizer) pair."""
        self.model, self.tokenizer = load(model, dtype=dtype) if isinstance(model, str) else model
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.dim = self.model.config.d_model

    def _states(self, texts: Sequence[str]):
        """Per batch: hidden states [B, T, D] (right-padded) and the mask of real tokens."""
        graphdef, state = nnx.split(self.model)
        for start in range(0, len(texts), self.batch_size):
            chunk = [self.tokenizer.encode(t)[: self.max_tokens] if t else [] for t in texts[start:start +
                                                                                             self.batch_size]]
            length = sampling.bucket(max(max(len(c) for c in chunk), 1))
            rows = sampling.bucket(len(chunk), minimum=1)
            tokens = np.full((rows, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((rows, length), bool)
            for r, ids in enumerate(chunk):
                tokens[r, : len(ids)], mask[r, : len(ids)] = ids, True
            yield np.asarray(_hidden(graphdef, state, tokens, mask))[: len(chunk)], mask[: len(chunk)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), D] float32; an empty text embeds to zeros."""
        out = []
        for hidden, mask in self._states(texts):
            counts = np.maximum(mask.sum(axis=1, keepdims=True), 1)
            out.append((hidden * mask[..., None]).sum(axis=1) / counts)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def token_states(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = []
        for hidden, mask in self._states(texts):
            out += [h[m] for h, m in zip(hidden, mask, strict=True)]
        return out


@functools.partial(jax.jit, static_argnames="graphdef")
def _hidden(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state).hidden_states(tokens, mask=mask)[0]

