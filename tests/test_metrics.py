"""Quality metrics against hand-computed values, and the router's question sources."""

import json

import numpy as np
import pytest

from jaxdistill.data import DataError, metrics
from jaxdistill.data.qa import FAMILIES, Question, adapt, read_questions, synthetic_questions, tfds_questions


def test_squad_normalisation_exact_match_and_f1():
    assert metrics.normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.exact_match("the Lisbon.", "Lisbon") == 1.0
    assert metrics.exact_match("Lisbon, Portugal", "Lisbon") == 0.0
    # pred tokens [sara, lives, in, lisbon], ref [lisbon]: P = 1/4, R = 1 -> F1 = 0.4
    assert metrics.token_f1("Sara lives in Lisbon.", "Lisbon") == pytest.approx(0.4)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("a", "b") == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "cat sat on mat" and "cat was on mat" is "cat on mat" (3): P = R = 3/4
    assert metrics.rouge_l("cat sat on mat", "cat was on mat") == pytest.approx(0.75)
    # pred 2 tokens, ref 4, LCS 2: P = 1, R = 0.5 -> F = 2/3
    assert metrics.rouge_l("cat mat", "cat sat on mat") == pytest.approx(2 / 3)
    assert metrics.rouge_l("dog", "cat") == 0.0


def test_yes_no_and_numeric():
    assert metrics.yes_no_accuracy("No, 34 is smaller.", "no") == 1.0
    assert metrics.yes_no_accuracy("Yes.", "no") == 0.0
    assert metrics.yes_no_accuracy("Maybe", "no") == 0.0
    assert metrics.numeric_match("So 12 times 7 is 84.", "84") == 1.0
    assert metrics.numeric_match("3 + 4 = 7 #### 1,200", "1200.0") == 1.0
    assert metrics.numeric_match("no number", "5") == 0.0


def test_sentiment_label_inside_a_sentence_counts():
    assert metrics.sentiment_accuracy("The review is positive.", "positive") == 1.0
    assert metrics.sentiment_accuracy("Negative", "negative") == 1.0
    assert metrics.sentiment_accuracy("negative, not positive", "positive") == 0.0  # the first label counts
    assert metrics.sentiment_accuracy("It was a great movie!", "positive") == 0.0  # no label: not guessed


def test_score_takes_the_best_reference_and_checks_inputs():
    got = metrics.score("f1", ["in Oslo", "Rome"], [("Oslo", "in Oslo"), "Paris"])
    np.testing.assert_allclose(got, [1.0, 0.0])
    with pytest.raises(ValueError, match="unknown quality metric 'bleu'"):
        metrics.score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="needs an encoder"):
        metrics.score("embedding", ["a"], ["a"])


def test_embedding_similarity_on_a_real_encoder(smollm2):
    from jaxdistill.router.experts import Encoder

    similarity = metrics.EmbeddingSimilarity(Encoder(smollm2))
    same, other = similarity(["The cat sat on the mat.", "The cat sat on the mat."],
                             ["The cat sat on the mat.", "Stock prices fell sharply in March."])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert other < same


def test_dataset_adapters_read_each_form(tmp_path):
    rows = {
        "boolq": {"question": "is water wet", "passage": "Water is wet.", "answer": True},
        "gsm8k": {"question": "2+2?", "answer": "2+2=4\n#### 4"},
        "squad": {"context": "Oslo is in Norway.", "question": "Where is Oslo?", "answers": {"text": ["Norway"]}},
        "hotpotqa": {"question": "Who?", "answer": "Ada", "context": [["Ada", ["Ada wrote code.", " Yes."]]]},
        "xsum": {"document": "Long text.", "summary": "Short."},
        "cnn_dailymail": {"article": "Long text.", "highlights": "Short."},
        "sst2": {"sentence": "great film", "label": 1},
    }
    expected = {"boolq": ("yes", "yes_no"), "gsm8k": ("4", "numeric"), "squad": ("Norway", "f1"),
                "hotpotqa": ("Ada", "f1"), "xsum": ("Short.", "rouge_l"), "cnn_dailymail": ("Short.", "rouge_l"),
                "sst2": ("positive", "sentiment")}
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        (q,) = read_questions(name, path)
        assert (q.references[0], q.metric) == expected[name], name
    assert "Ada: Ada wrote code. Yes." in read_questions("hotpotqa", tmp_path / "hotpotqa.jsonl")[0].text


def test_malformed_question_records_name_file_record_and_field(tmp_path):
    path = tmp_path / "squad.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answers": {"text": ["a"]}}) + "\n\n"
                    + json.dumps({"context": "c", "answers": {"text": ["a"]}}) + "\n")
    with pytest.raises(DataError, match=r"squad.jsonl, record 2 \(line 3\): missing field 'question'"):
        read_questions("squad", path)
    with pytest.raises(DataError, match="field 'label' must be 0/1"):
        adapt("sst2", {"sentence": "x", "label": 7}, "f, record 1", "u")
    with pytest.raises(ValueError, match="unknown dataset 'trivia'"):
        read_questions("trivia", path)


def test_tfds_questions_not_prepared_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build bool_q"):
        tfds_questions("boolq", "train", str(tmp_path))


def test_train_and_test_questions_are_disjoint(tmp_path, capsys):
    from ml_collections import ConfigDict

    from jaxdistill.data.qa import load_questions

    # the router's default sizes: the families have few distinct questions, so repeats are likely
    train, test = load_questions(ConfigDict(dict(source="synthetic", train_size=128, test_size=64, seed=0)))
    assert len(train) == 128 and len(test) == 64
    assert not {metrics.normalize(q.text) for q in train} & {metrics.normalize(q.text) for q in test}
    rows = [{"sentence": f"film {i}", "label": i % 2} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]) + "\n")
    config = ConfigDict(dict(source="jsonl", dataset="sst2", train_path=str(tmp_path / "train.jsonl"),
                             test_path=str(tmp_path / "test.jsonl"), train_size=0, test_size=0))
    train, test = load_questions(config)
    assert [q.text for q in train] == [f'Review: "film {i}"\nIs this review positive or negative?' for i in range(4)]
    assert "left out 2 training questions that also appear in the test split" in capsys.readouterr().out


def test_synthetic_questions_are_seeded_balanced_and_split():
    a, b = synthetic_questions(40, seed=3), synthetic_questions(40, seed=3)
    assert a == b
    test = synthetic_questions(40, seed=3, split="test")
    assert [q.text for q in a] != [q.text for q in test]  # train and test draw from different streams
    assert [q.family for q in a[:4]] == list(FAMILIES)
    for q in a:
        assert isinstance(q, Question)
        if q.family == "multiply":
            x, y = map(int, q.text.removeprefix("What is ").removesuffix("?").split(" times "))
            assert q.references == (str(x * y),)


@pytest.mark.parametrize("dataset,metric", [("boolq", "yes_no"), ("squad", "f1")])
def test_tfds_questions_read_through_data_source(dataset, metric):
    import tensorflow_datasets as tfds

    # mock_data serves random examples with the real feature spec through tfds.data_source
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        questions = tfds_questions(dataset, "train", None, limit=2)
    assert len(questions) == 2
    for q in questions:
        assert q.metric == metric and q.references and all(isinstance(r, str) for r in q.references)
        assert q.text.startswith("Passage:" if dataset == "boolq" else "Context:")
    if dataset == "boolq":
        assert all(q.references[0] in ("yes", "no") for q in questions)
