"""The non-verifiable task: synthetic conversations revised under constraints, and their checks."""

import json

import numpy as np
import pytest

from jaxdistill.data import DataError, conversation_records, read_jsonl
from jaxdistill.data.conversations import is_test
from jaxdistill.data.metrics import passes_checks


def key(r):
    return r.history, r.problem, r.solution


def test_splits_never_share_a_conversation_and_every_family_appears():
    train, test = conversation_records(1500, 0, "train"), conversation_records(90, 0, "test")
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert all(is_test(r) for r in test) and not any(is_test(r) for r in train)
    for split in (train, test):
        families = {r.history[0][1].split()[0] for r in split}  # "List", "Here", "Write"
        assert families == {"List", "Here", "Write"}
    assert conversation_records(10, 3, "test") == conversation_records(10, 3, "test")  # seeded


def test_accepted_replies_meet_their_checks_and_first_replies_do_not():
    records = conversation_records(300, 1, "train") + conversation_records(100, 1, "test")
    assert all(r.answer is None and r.checks for r in records)
    assert all(passes_checks(r.solution, r.checks) for r in records)
    assert not any(passes_checks(r.history[-1][1], r.checks) for r in records)


@pytest.mark.parametrize("reply,checks,ok", [
    ("1. apple\n2. banana\n3. kiwi", (("line_count", "3"), ("numbered", ""), ("alphabetical", "")), True),
    ("1. banana\n2. apple\n3. kiwi", (("alphabetical", ""),), False),
    ("1. apple\n3. banana", (("numbered", ""),), False),
    ("1. apple\n2. banana", (("line_count", "3"),), False),
    ("1. apple\n2. sofa", (("items_from", "fruits"),), False),
    ("THE SEA IS CALM!", (("uppercase", ""), ("ends_with", "!"), ("max_words", "4"), ("contains", "sea")), True),
    ("THE SEA IS VERY CALM!", (("max_words", "4"),), False),
    ("The sea is calm!", (("uppercase", ""),), False),
    ("the seas are calm.", (("contains", "sea"),), False),
    ("55 | 33 | 7", (("sorted_numbers", "7,55,33"), ("separator", "|")), True),
    ("55, 33, 7", (("separator", "|"),), False),
    ("33 | 55 | 7", (("sorted_numbers", "7,55,33"),), False),
])
def test_checks_catch_each_kind_of_violation(reply, checks, ok):
    assert passes_checks(reply, checks) is ok


def test_unknown_checks_are_refused():
    with pytest.raises(ValueError, match="unknown checks"):
        passes_checks("x", (("rhymes", ""),))


def test_conversation_jsonl_carries_checks(tmp_path):
    path = tmp_path / "c.jsonl"
    messages = [{"role": "user", "content": "List 2 fruits."}, {"role": "assistant", "content": "1. apple\n2. kiwi"}]
    path.write_text(json.dumps({"messages": messages, "checks": [["line_count", 2]]}) + "\n")
    (record,) = read_jsonl(path)
    assert record.checks == (("line_count", "2"),) and passes_checks(record.solution, record.checks)
    path.write_text(json.dumps({"messages": messages, "checks": "line_count"}) + "\n")
    with pytest.raises(DataError, match="'checks' must be a list"):
        read_jsonl(path)


def test_evaluation_scores_constraints_and_the_accepted_replies_log_prob(smollm2):
    from jaxdistill.distill.evaluate import evaluate

    model, tok = smollm2
    records = conversation_records(6, 0, "test")
    row = evaluate(model, tok, records, max_new_tokens=24, batch_size=6)
    assert 0.0 <= row["constraints"] <= 1.0
    assert np.isnan(row["accuracy"])  # nothing to match exactly
    assert np.isfinite(row["reference_logp"]) and row["reference_logp"] < 0
    assert row["hint_uplift_logp"] > 0  # the accepted reply is far likelier with it in the prompt
