"""The record every source produces, and reading records from JSONL files.

A record is a problem, a solution the teacher sees as a hint, and (when verifiable) an
exact answer. Three JSONL forms are read:
- GSM8K: {"question", "answer"} where the answer ends with "#### N";
- generic: {"prompt", "solution", "answer"?};
- conversations: {"messages": [{"role", "content"}, ...], "checks"?: [[kind, arg], ...]},
  where the last assistant message (the reply the user accepted) is the solution and the
  messages before it are the problem; there is no exact answer (the non-verifiable case),
  and the optional checks are constraints evaluation applies (`eval.metrics.CHECKS`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from jaxdistill.errors import DataError


@dataclasses.dataclass(frozen=True)
class Record:
    uid: str
    problem: str  # the user's request; for conversations, the earlier turns rendered as text
    solution: str  # the reference the teacher sees as a hint
    answer: str | None = None  # exact answer when the task is verifiable
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns of a conversation
    checks: tuple[tuple[str, str], ...] = ()  # (kind, argument) constraints a good reply meets (evaluation only)


_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer after '####', else the last number in the text; normalised (no commas, no .0)."""
    m = _ANSWER.search(text)
    candidate = m.group(1) if m else None
    numbers = _NUMBER.findall(candidate if candidate else text)
    if not numbers:
        return candidate.strip() if candidate else None
    value = numbers[0] if candidate else numbers[-1]
    value = value.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def answer_matches(text: str, answer: str | None) -> bool:
    """Whether a reply's final answer (`extract_answer`) is `answer`, ignoring case, surrounding spaces and a
    trailing full stop (so '#### Lima.' answers 'Lima'); False when the task has no exact answer."""
    predicted = extract_answer(text)
    canonical = lambda a: a.strip().rstrip(".").strip().lower()  # noqa: E731
    return answer is not None and predicted is not None and canonical(predicted) == canonical(answer)


def require_field(record: dict, field: str, where: str, kind=str) -> Any:
    if field not in record:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(record)}).")
    if not isinstance(record[field], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}: field {field!r} must be {expected}, got {type(record[field]).__name__}.")
    return record[field]


def parse_record(record: Any, where: str, uid: str) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        messages = require_field(record, "messages", where, list)
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'.")
            place = f"{where} messages[{i}]"
            turns.append((require_field(m, "role", place), require_field(m, "content", place)))
        last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
        if last is None or last == 0 or turns[last - 1][0] != "user":
            raise DataError(f"{where}: field 'messages' needs a user message followed by the accepted assistant reply.")
        history = tuple(turns[: last - 1])
        checks = record.get("checks", [])
        if not isinstance(checks, list) or not all(isinstance(c, list) and len(c) == 2 for c in checks):
            raise DataError(f"{where}: field 'checks' must be a list of [kind, argument] pairs.")
        return Record(uid=uid, problem=turns[last - 1][1], solution=turns[last][1], answer=None, history=history,
                      checks=tuple((str(k), str(a)) for k, a in checks))
    if "question" in record:  # GSM8K
        question = require_field(record, "question", where)
        full = require_field(record, "answer", where)
        if "####" not in full:
            raise DataError(f"{where}: field 'answer' has no '#### <final answer>' line (GSM8K form).")
        return Record(uid=uid, problem=question, solution=full.strip(), answer=extract_answer(full))
    if "prompt" in record:
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: field 'answer' must be a string or a number.")
        return Record(uid=uid, problem=require_field(record, "prompt", where),
                      solution=require_field(record, "solution", where),
                      answer=None if answer is None else extract_answer(str(answer)) or str(answer))
    raise DataError(
        f"{where}: unknown record form (fields: {sorted(record)}); expected 'question'+'answer' (GSM8K), "
        "'prompt'+'solution' (generic) or 'messages' (conversation)."
    )


def iter_jsonl(path: str | Path):
    """Yield (where, uid, object) for each non-blank line; `where` names the file, record and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist.")
    if path.is_dir():
        raise DataError(f"{path} is a directory; point at a .jsonl file.")
    count = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); re-save the file as UTF-8.") from None
            if not line.strip():
                continue
            count += 1
            where = f"{path}, record {count} (line {line_no})"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
            yield where, f"{path.stem}-{line_no}", obj
    if not count:
        raise DataError(f"{path} holds no records.")


def iter_tfds(name: str, split: str, data_dir: str | None, limit: int = 0):
    """Yield (where, index, example) from a prepared TFDS dataset (bytes decoded to str), via tfds.data_source."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in {data_dir or '~/tensorflow_datasets'} ({e}). "
            f"Prepare it once on a machine with internet access (`tfds build {name} --file_format=array_record`) "
            "and point data.tfds_data_dir at it."
        ) from e
    count = len(source) if not limit else min(limit, len(source))
    for i in range(count):
        example = {k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()}
        yield f"tfds {name}/{split}, record {i}", i, example


def read_jsonl(path: str | Path) -> list[Record]:
    return [parse_record(obj, where, uid) for where, uid, obj in iter_jsonl(path)]
