"""Exact-match metric and the prompt-only baseline's few-shot prompt."""

import pytest

from nemo_adapt.data.formats import Record
from nemo_adapt.eval.task import baseline_messages, exact_match, few_shot_messages, normalize_answer


def rec(i: int, system: bool = True) -> Record:
    msgs = ([{"role": "system", "content": "Instructions."}] if system else []) + [
        {"role": "user", "content": f"ticket {i}"}, {"role": "assistant", "content": f"team: T{i}; priority: P1"}]
    return Record(messages=tuple(msgs), path="train.jsonl", line=i + 1)


def test_normalize_and_exact_match():
    assert normalize_answer("  Team:  Ledger Ops;\n priority: P2 \t") == "team: ledger ops; priority: p2"
    assert exact_match("team: Ledger Ops; priority: P2", " TEAM: ledger ops;  priority: p2\n")
    assert not exact_match("team: Ledger Ops; priority: P3", "team: Ledger Ops; priority: P2")
    assert not exact_match("team: LedgerOps; priority: P2", "team: Ledger Ops; priority: P2")
    assert not exact_match("", "x") and exact_match("", "  ")


def test_few_shot_messages_are_deterministic_worked_examples():
    train = [rec(i) for i in range(10)]
    shots = few_shot_messages(train, 3, seed=0)
    assert shots == few_shot_messages(train, 3, seed=0)
    assert shots != few_shot_messages(train, 3, seed=1)
    assert shots[0] == {"role": "system", "content": "Instructions."}
    assert [m["role"] for m in shots[1:]] == ["user", "assistant"] * 3
    assert all(m["content"].startswith("team:") for m in shots[2::2])
    assert few_shot_messages(train, 0, seed=0) == [shots[0]]
    assert few_shot_messages([rec(0, system=False)], 1, seed=0)[0]["role"] == "user"
    with pytest.raises(ValueError, match="k=11"):
        few_shot_messages(train, 11, seed=0)


def test_baseline_messages_put_the_test_prompt_after_the_shots():
    train = [rec(i) for i in range(5)]
    shots = few_shot_messages(train, 2, seed=0)
    test = rec(99)
    chat = baseline_messages(shots, test.prompt)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert chat[-1]["content"] == "ticket 99"
    assert sum(m["role"] == "system" for m in chat) == 1
    bare = baseline_messages([], rec(5, system=False).prompt)
    assert bare == [{"role": "user", "content": "ticket 5"}]
