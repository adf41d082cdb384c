"""Question/answer tasks for the router: synthetic mixed tasks, JSONL files, TFDS.

Every source yields `Question`s: the text an expert sees, the reference answer(s) and the
metric that scores answers (see jaxdistill.data.metrics). One adapter per dataset turns a
raw record (a dict, from a JSONL line or a TFDS example) into a Question, so both sources
read the same fields:

| dataset        | fields                                   | metric      |
|----------------|------------------------------------------|-------------|
| boolq          | question, passage, answer (bool)         | yes_no      |
| gsm8k          | question, answer ("... #### N")          | numeric     |
| squad          | context, question, answers.text (list)   | f1          |
| hotpotqa       | question, answer, context (optional)     | f1          |
| xsum           | document, summary                        | rouge_l     |
| cnn_dailymail  | article, highlights                      | rouge_l     |
| sst2           | sentence, label (0/1)                    | sentiment   |

The synthetic default mixes four families (multiplication, comparison, extraction,
sentiment) scored by different metrics, on which the small offline models have different
strengths, so that which expert to call depends on the question.

Train and test never share a question: a training question whose normalised text is also in
the test split is left out (synthetic: drawn again; files: dropped, with a printed count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxdistill.data.metrics import check_metric, normalize
from jaxdistill.data.records import DataError, Record, extract_answer, iter_jsonl, iter_tfds, require_field


@dataclasses.dataclass(frozen=True)
class Question:
    uid: str
    text: str
    references: tuple[str, ...]  # any of them counts as right
    metric: str
    family: str = ""

    def __post_init__(self):
        check_metric(self.metric)
        if not self.references:
            raise ValueError(f"question {self.uid} has no reference answer.")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _boolq(r, where):
    answer = require_field(r, "answer", where, (bool, np.bool_, int, str))
    yes = answer if isinstance(answer, str) else bool(answer)
    reference = ("yes" if yes else "no") if not isinstance(yes, str) else yes.lower()
    text = f"Passage: {require_field(r, 'passage', where)}\nQuestion: {require_field(r, 'question', where)}?\n" \
           "Answer yes or no."
    return text, (reference,), "yes_no"


def _gsm8k(r, where):
    answer = require_field(r, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: field 'answer' has no '#### <final answer>' line (GSM8K form).")
    return require_field(r, "question", where), (extract_answer(answer),), "numeric"


def _squad(r, where):
    answers = require_field(r, "answers", where, (dict, list))
    texts = answers.get("text") if isinstance(answers, dict) else answers
    texts = [_text(t) for t in np.asarray(texts, dtype=object).ravel()] if texts is not None else []
    if not texts:
        raise DataError(f"{where}: field 'answers' holds no answer text.")
    text = f"Context: {require_field(r, 'context', where)}\nQuestion: {require_field(r, 'question', where)}"
    return text, tuple(texts), "f1"


def _hotpotqa(r, where):
    question = require_field(r, "question", where)
    context = r.get("context")
    if context:  # [[title, [sentences]], ...] as in the HotpotQA files
        try:
            paragraphs = [f"{title}: {''.join(sentences)}" for title, sentences in context]
        except (TypeError, ValueError):
            raise DataError(f"{where}: field 'context' must be a list of [title, [sentences]] pairs.") from None
        question = "Context:\n" + "\n".join(paragraphs) + f"\nQuestion: {question}"
    return question, (require_field(r, "answer", where),), "f1"


def _summary(document_field, summary_field):
    def adapt(r, where):
        text = f"Summarize in one sentence:\n{require_field(r, document_field, where)}"
        return text, (require_field(r, summary_field, where),), "rouge_l"
    return adapt


def _sst2(r, where):
    label = require_field(r, "label", where, (int, np.integer, str))
    names = {0: "negative", 1: "positive", "0": "negative", "1": "positive"}
    reference = names.get(label, str(label).lower())
    if reference not in ("negative", "positive"):
        raise DataError(f"{where}: field 'label' must be 0/1 or negative/positive, got {label!r}.")
    text = f"Review: \"{require_field(r, 'sentence', where)}\"\nIs this review positive or negative?"
    return text, (reference,), "sentiment"


ADAPTERS: dict[str, Callable] = {
    "boolq": _boolq, "gsm8k": _gsm8k, "squad": _squad, "hotpotqa": _hotpotqa,
    "xsum": _summary("document", "summary"), "cnn_dailymail": _summary("article", "highlights"), "sst2": _sst2,
}
TFDS_NAMES = {"boolq": "bool_q", "gsm8k": "gsm8k", "squad": "squad", "xsum": "xsum",
              "cnn_dailymail": "cnn_dailymail", "sst2": "glue/sst2"}


def _adapter(dataset: str) -> Callable:
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(ADAPTERS)} (or 'synthetic').")
    return ADAPTERS[dataset]


def adapt(dataset: str, record, where: str, uid: str, metric: str = "") -> Question:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    text, references, default_metric = _adapter(dataset)(record, where)
    return Question(uid, text, tuple(references), metric or default_metric, dataset)


def read_questions(dataset: str, path, metric: str = "") -> list[Question]:
    _adapter(dataset)
    return [adapt(dataset, obj, where, uid, metric) for where, uid, obj in iter_jsonl(path)]


def tfds_questions(dataset: str, split: str, data_dir: str | None, limit: int = 0, metric: str = "") -> list[Question]:
    _adapter(dataset)
    if dataset not in TFDS_NAMES:
        raise ValueError(f"{dataset!r} is not in TFDS; read it from JSONL (data.source='jsonl').")
    return [adapt(dataset, raw, where, f"{dataset}-{split}-{i}", metric)
            for where, i, raw in iter_tfds(TFDS_NAMES[dataset], split, data_dir, limit)]


# --- the synthetic default --------------------------------------------------------------

_NAMES = ["Sara", "Omar", "Lena", "Ravi", "Mia", "Tom", "Ana", "Ken", "Ivy", "Noah", "Zoe", "Yuki"]
_CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Seoul", "Dublin", "Quito", "Rome", "Accra", "Hanoi", "Bern", "Riga"]
_JOBS = ["baker", "pilot", "nurse", "farmer", "painter", "teacher", "driver", "chef"]
_GOOD = ["wonderful", "great", "delightful", "excellent", "lovely", "brilliant"]
_BAD = ["awful", "terrible", "boring", "horrible", "dreadful", "dull"]
_THINGS = ["movie", "meal", "book", "concert", "hotel", "game"]
FAMILIES = ("multiply", "compare", "extract", "sentiment")


def _synthetic(family: str, rng: np.random.Generator) -> tuple[str, str, str]:
    if family == "multiply":
        a, b = rng.integers(2, 10, size=2)
        return f"What is {a} times {b}?", str(a * b), "numeric"
    if family == "compare":
        a, b = rng.choice(np.arange(10, 100), size=2, replace=False)
        return f"Is {a} larger than {b}? Answer yes or no.", "yes" if a > b else "no", "yes_no"
    if family == "extract":
        name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
        return f"{name} is a {job} who lives in {city}. In which city does {name} live?", str(city), "f1"
    if family == "sentiment":
        good = bool(rng.integers(2))
        word, thing = rng.choice(_GOOD if good else _BAD), rng.choice(_THINGS)
        return (f"Review: \"The {thing} was {word}.\" Is this review positive or negative?",
                "positive" if good else "negative", "sentiment")
    raise ValueError(f"unknown synthetic family {family!r}; choose from {FAMILIES}.")


def synthetic_questions(count: int, seed: int, split: str = "train", families: tuple[str, ...] = FAMILIES,
                        exclude: set[str] = frozenset()) -> list[Question]:
    """`count` questions cycling through the families, none of whose normalised text is in `exclude`
    (train passes the test texts); train and test draw from different seeds."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    out = []
    for i in range(count):
        family = families[i % len(families)]
        for _ in range(1000):
            text, reference, metric = _synthetic(family, rng)
            if normalize(text) not in exclude:
                break
        else:
            raise DataError(f"could not draw {count} {split} questions outside the test split; the {family!r} "
                            "family has too few distinct questions. Lower data.train_size or data.test_size.")
        out.append(Question(f"synthetic-{split}-{i}", text, (reference,), metric, family))
    return out


def as_records(questions: list[Question]) -> list[Record]:
    """Questions as records for the teacher stack and the self-distillation loaders: the reference is the exact
    answer and the solution (the hint, and the few-shot examples' answers) states it on a '####' line."""
    return [Record(q.uid, q.text, f"The answer is {q.references[0]}.\n#### {q.references[0]}", q.references[0])
            for q in questions]


def without_test_questions(train: list[Question], test: list[Question]) -> list[Question]:
    """The training questions whose normalised text is not in the test split (prints how many left out)."""
    seen = {normalize(q.text) for q in test}
    kept = [q for q in train if normalize(q.text) not in seen]
    if len(kept) < len(train):
        print(f"data: left out {len(train) - len(kept)} training questions that also appear in the test split",
              flush=True)
    return kept


def load_questions(config) -> tuple[list[Question], list[Question]]:
    """(train, test) questions from config.source: synthetic | jsonl | tfds."""
    source, metric = config.source, config.get("metric", "")
    if source == "synthetic":
        families = tuple(config.get("families", FAMILIES))
        test = synthetic_questions(config.test_size, config.seed, "test", families)
        exclude = {normalize(q.text) for q in test}
        return synthetic_questions(config.train_size, config.seed, "train", families, exclude), test
    if source == "jsonl":
        test = read_questions(config.dataset, config.test_path, metric)[: config.test_size or None]
        train = without_test_questions(read_questions(config.dataset, config.train_path, metric), test)
        return train[: config.train_size or None], test
    if source == "tfds":
        split = config.get("test_split", "validation")
        test = tfds_questions(config.dataset, split, config.get("tfds_data_dir"), config.test_size, metric)
        train = tfds_questions(config.dataset, "train", config.get("tfds_data_dir"), config.train_size, metric)
        return without_test_questions(train, test), test
    raise ValueError(f"data.source {source!r} is not one of 'synthetic', 'jsonl', 'tfds'.")
