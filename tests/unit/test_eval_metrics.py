"""Task metrics with values worked out by hand on small prediction lists."""

import pytest

from nemo_adapt.eval.metrics import (
    interval,
    label_fields,
    named_labels,
    parse_fields,
    task_metrics,
    task_score,
    token_f1,
)

REFS = ["team: Ledger Ops; priority: P1", "team: KYC Review; priority: P4", "team: Ledger Ops; priority: P2",
        "team: KYC Review; priority: P1"]


def test_parse_fields():
    assert parse_fields("team: Ledger Ops; priority: P1") == {"team": "Ledger Ops", "priority": "P1"}
    assert parse_fields("Team: Ledger Ops\npriority:P1;") == {"team": "Ledger Ops", "priority": "P1"}
    assert parse_fields("Sure! The team is Ledger Ops") is None
    assert parse_fields("team: a; team: b") is None
    assert parse_fields("  ") is None


def test_token_f1_by_hand():
    # [ledger, ops, team] vs [ledger, ops]: precision 2/3, recall 1 -> F1 = 2 * (2/3) / (5/3) = 0.8
    assert token_f1("the Ledger Ops team", "Ledger Ops") == pytest.approx(0.8)
    assert token_f1("P1", "P1") == 1.0
    assert token_f1("nothing alike", "Ledger Ops") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_named_labels_counts_whole_words_and_the_longest_label():
    labels = ["Ledger Ops", "Ops", "P1", "P10"]
    assert named_labels("Send it to ledger ops, P10", labels) == ["Ledger Ops", "P10"]
    assert named_labels("ops team", labels) == ["Ops"]
    assert named_labels("P1x", labels) == []


def test_field_and_label_accuracy_and_confusion_by_hand():
    preds = ["team: Ledger Ops; priority: P1",        # all right
             "team: KYC Review; priority: P3",        # team right, priority wrong (P3 is not a label here)
             "It is for ledger ops, I think. P2",     # not a field answer: fields wrong; labels named leniently
             "team: Ledger Ops; priority: P1 or P4"]  # team wrong; priority names two labels
    m = task_metrics(preds, REFS)
    assert m["exact_match"]["value"] == 0.25
    assert m["field_accuracy"]["team"]["value"] == 0.5          # examples 1, 2
    assert m["field_accuracy"]["priority"]["value"] == 0.25     # example 1
    assert label_fields(REFS) == {"team": ["KYC Review", "Ledger Ops"], "priority": ["P1", "P2", "P4"]}
    # Lenient: example 3 names Ledger Ops (team right) and P2 (priority right); example 4's priority names two.
    assert m["label_accuracy"]["team"]["value"] == 0.75         # 1, 2, 3
    assert m["label_accuracy"]["priority"]["value"] == 0.5      # 1, 3
    assert m["confusion"]["priority"] == {"P1": {"P1": 1, "(several)": 1}, "P2": {"P2": 1}, "P4": {"(none)": 1}}
    assert m["confusion"]["team"] == {"Ledger Ops": {"Ledger Ops": 2}, "KYC Review": {"KYC Review": 1,
                                                                                    "Ledger Ops": 1}}
    assert task_score(m, "field_accuracy") == pytest.approx(0.375)   # mean of 0.5 and 0.25
    assert task_score(m, "label_accuracy") == pytest.approx(0.625)
    assert task_score(m, "exact_match") == 0.25


def test_single_label_and_free_text_tasks():
    m = task_metrics(["positive", "The review is negative.", "neutral"], ["positive", "negative", "positive"])
    assert "field_accuracy" not in m
    assert m["label_accuracy"]["answer"]["value"] == pytest.approx(2 / 3)  # "neutral" names no allowed label
    free = task_metrics(["a cat sat", "dogs bark"], ["the cat sat down", "birds sing"])
    assert "label_accuracy" not in free and "field_accuracy" not in free
    with pytest.raises(ValueError, match="no label fields; use exact_match or token_f1"):
        task_score(free, "label_accuracy")
    with pytest.raises(ValueError, match="unknown task metric 'bleu'"):
        task_score(free, "bleu")


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    scores = [1.0] * 81 + [0.0] * 19
    a, b = interval(scores), interval(scores)
    assert a == b and a["value"] == 0.81 and a["n"] == 100
    # Normal approximation for a proportion: 0.81 +- 1.96 * sqrt(0.81 * 0.19 / 100) = 0.81 +- 0.077.
    assert a["low"] == pytest.approx(0.733, abs=0.02) and a["high"] == pytest.approx(0.887, abs=0.02)
    assert interval([1.0, 1.0]) == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    assert interval([]) == {"value": 0.0, "low": 0.0, "high": 0.0, "n": 0}
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        task_metrics(["a", "b", "c"], ["a", "b"])
