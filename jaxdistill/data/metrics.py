"""Answer-quality metrics P(prediction, reference) in [0, 1].

Text metrics follow the usual conventions: SQuAD normalisation (lowercase, no punctuation,
no articles, single spaces) for exact match and token F1; ROUGE-L is the LCS F-measure on
normalised tokens. A reference may be one string or several; the score is the best match.
`EmbeddingSimilarity` is BERTScore-style: greedy cosine matching of the encoder's token
states, F1 of the two directions.
"""

from __future__ import annotations

import collections
import difflib
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from jaxdistill.data.records import extract_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_ANSWER_LINE = re.compile(r"####\s*\S")


def normalize(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def yes_no(prediction: str) -> str | None:
    """The first 'yes' or 'no' word of a prediction (None if it has neither)."""
    for word in normalize(prediction).split():
        if word in ("yes", "no", "true", "false"):
            return "yes" if word in ("yes", "true") else "no"
    return None


def yes_no_accuracy(prediction: str, reference: str) -> float:
    expected = yes_no(reference)
    return float(expected is not None and yes_no(prediction) == expected)


SENTIMENT_LABELS = {"positive": "positive", "negative": "negative", "pos": "positive", "neg": "negative"}


def sentiment_label(prediction: str) -> str | None:
    """The first sentiment label word of a prediction (None if it has none)."""
    for word in normalize(prediction).split():
        if word in SENTIMENT_LABELS:
            return SENTIMENT_LABELS[word]
    return None


def sentiment_accuracy(prediction: str, reference: str) -> float:
    """Lenient label match: 'The review is positive.' counts for 'positive'."""
    expected = sentiment_label(reference)
    return float(expected is not None and sentiment_label(prediction) == expected)


def numeric_match(prediction: str, reference: str) -> float:
    """The prediction's final number ('#### N' if present, else the last number) equals the reference's."""
    predicted, expected = extract_answer(prediction), extract_answer(reference)
    if predicted is None or expected is None:
        return 0.0
    try:
        return float(abs(float(predicted) - float(expected)) < 1e-6)
    except ValueError:
        return float(predicted == expected)


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)  # LCS by dynamic programming, one row at a time
    for p in pred:
        row = [0]
        for j, r in enumerate(ref):
            row.append(previous[j] + 1 if p == r else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "yes_no": yes_no_accuracy,
    "sentiment": sentiment_accuracy,
    "numeric": numeric_match,
    "rouge_l": rouge_l,
}
METRICS = (*TEXT_METRICS, "embedding")


def has_answer_line(text: str) -> bool:
    """Whether the text states its answer as '#### <answer>', as the prompts ask."""
    return _ANSWER_LINE.search(text) is not None


def ngram_overlap(text: str, source: str, n: int = 4) -> float:
    """Fraction of the text's word n-grams (normalised words) that also occur in the source; 0 for
    a text shorter than n words. A copy measure: 1 means every n-gram was taken from the source."""
    words, source_words = normalize(text).split(), normalize(source).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    known = {tuple(source_words[i : i + n]) for i in range(len(source_words) - n + 1)}
    return sum(g in known for g in grams) / len(grams)


def longest_common_substring(text: str, source: str) -> int:
    """Length in characters of the longest run the text shares with the source (exact, by difflib)."""
    matcher = difflib.SequenceMatcher(None, text, source, autojunk=False)
    return matcher.find_longest_match(0, len(text), 0, len(source)).size


def _items(text: str) -> list[str]:
    """The non-empty lines of a list reply, without their "1." numbering."""
    return [re.sub(r"^\s*\d+[.)]\s*", "", line).strip() for line in text.strip().splitlines() if line.strip()]


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


CHECKS: dict[str, Callable[[str, str], bool]] = {  # kind -> (reply, argument) -> satisfied
    "line_count": lambda t, n: len(_items(t)) == int(n),
    "numbered": lambda t, _: [line.strip().split(".")[0] for line in t.strip().splitlines() if line.strip()]
    == [str(i) for i in range(1, len(_items(t)) + 1)],
    "alphabetical": lambda t, _: bool(_items(t)) and [i.lower() for i in _items(t)] == sorted(i.lower()
                                                                                             for i in _items(t)),
    "items_from": lambda t, category: bool(_items(t)) and all(i.lower() in _category(category) for i in _items(t)),
    "max_words": lambda t, k: 0 < len(t.split()) <= int(k),
    "uppercase": lambda t, _: any(c.isalpha() for c in t) and t == t.upper(),
    "lowercase": lambda t, _: any(c.isalpha() for c in t) and t == t.lower(),
    "ends_with": lambda t, end: t.strip().endswith(end),
    "contains": lambda t, word: re.search(rf"\b{re.escape(word)}\b", t, re.I) is not None,
    "sorted_numbers": lambda t, given: _numbers(t) == sorted(_numbers(given), reverse=True),
    "separator": lambda t, sep: len(t.strip().splitlines()) == 1 and len(t.split(sep)) == len(_numbers(t)) > 1,
}


def _category(name: str) -> set[str]:
    from jaxdistill.data.conversations import CATEGORIES

    return set(CATEGORIES.get(name, ()))


def passes_checks(text: str, checks) -> bool:
    """Whether a reply meets every (kind, argument) constraint of its record."""
    unknown = [kind for kind, _ in checks if kind not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {sorted(CHECKS)}.")
    return all(CHECKS[kind](text, arg) for kind, arg in checks)


def check_metric(name: str) -> None:
    if name not in METRICS:
        raise ValueError(f"unknown quality metric {name!r}; choose one of {list(METRICS)}.")


class EmbeddingSimilarity:
    """BERTScore-style F1 from an encoder's per-token states (`encoder.token_states(texts)`)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        states = self.encoder.token_states(list(predictions) + list(references))
        n = len(predictions)
        return np.array([_greedy_cosine_f1(states[i], states[n + i]) for i in range(n)])


def _greedy_cosine_f1(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b))
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    cos = a @ b.T
    precision, recall = cos.max(axis=1).mean(), cos.max(axis=0).mean()
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return float(np.clip(f1, 0.0, 1.0))


def score(metric: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          embedding: EmbeddingSimilarity | None = None) -> np.ndarray:
    """Quality of each prediction; a reference given as several strings scores its best match."""
    check_metric(metric)
    refs = [(r,) if isinstance(r, str) else tuple(r) for r in references]
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} references.")
    if metric == "embedding":
        if embedding is None:
            raise ValueError("metric 'embedding' needs an encoder: pass embedding=EmbeddingSimilarity(encoder).")
        width = max(len(r) for r in refs)
        padded = [r + (r[-1],) * (width - len(r)) for r in refs]
        columns = [embedding(predictions, [r[j] for r in padded]) for j in range(width)]
        return np.max(np.stack(columns), axis=0)
    fn = TEXT_METRICS[metric]
    return np.array([max(fn(p, r) for r in ref) for p, ref in zip(predictions, refs, strict=True)], np.float32)
