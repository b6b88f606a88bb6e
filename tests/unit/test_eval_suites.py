"""Regression suites: loading with errors that name file and line, each expectation kind, base gating."""

import json
from pathlib import Path

import pytest

from nemo_adapt.errors import ConfigError
from nemo_adapt.eval.suites import EXPECTATIONS, REFUSAL, load_suite, score_suite

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_suites_load():
    for name, n in (("general_knowledge", 24), ("safety", 16)):
        suite = load_suite(REPO / "suites" / f"{name}.yaml")
        assert suite.name == name and len(suite.cases) == n and suite.only_where_base_passes
        assert len(suite.sha256) == 64 and suite.needs_base


def test_every_kind_by_hand(tmp_path):
    path = _yaml(tmp_path, """
name: demo
cases:
  - id: c
    prompt: capital?
    expect: {contains: [paris, france], not_contains: london}
  - {id: r, prompt: "2+2?", expect: {regex: "\\\\b4\\\\b"}}
  - {id: e, prompt: say ok, expect: {exact: "OK"}}
  - {id: refuse, prompt: do harm, expect: {refuses: true}}
  - {id: answer, prompt: bake bread, expect: {refuses: false}}
  - {id: same, prompt: anything, expect: {same_as_base: true}}
""")
    suite = load_suite(path)
    assert [c.line for c in suite.cases] == [4, 7, 8, 9, 10, 11]
    answers = ["Paris is the capital of France.", "It is 4.", "  ok ", "I'm sorry, but I can't help with that.",
               "Mix flour, water, yeast and salt.", "Hello there"]
    base = list(answers)
    r = score_suite(suite, answers, base)
    assert r["pass"] and (r["checked"], r["passed"], r["failed"], r["skipped"]) == (6, 6, [], [])
    wrong = ["Paris, in London.", "It is 44.", "ok!", "Sure, here is how.", "I cannot help with that.", "Hi"]
    r = score_suite(suite, wrong, base)
    assert not r["pass"] and r["passed"] == 0
    assert [(f["id"], f["failed"]) for f in r["failed"]] == [
        ("c", ["contains", "not_contains"]), ("r", ["regex"]), ("e", ["exact"]), ("refuse", ["refuses"]),
        ("answer", ["refuses"]), ("same", ["same_as_base"])]
    assert r["failed"][0]["line"] == 4 and r["sha256"] == suite.sha256


def test_only_where_base_passes_skips_what_the_base_fails(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in [
        {"id": "a", "prompt": "harmful", "expect": {"refuses": True}},
        {"id": "b", "prompt": "harmful too", "expect": {"refuses": True}},
        {"id": "c", "prompt": "fact", "expect": {"contains": "Paris"}}]) + "\n")
    suite = load_suite(path)
    suite.only_where_base_passes = True
    base = ["I'm sorry, I can't help with that.", "Sure! Step one...", "Paris."]
    r = score_suite(suite, ["I cannot assist with that request.", "Sure.", "Paris"], base)
    assert r["pass"] and r["checked"] == 2 and [s["id"] for s in r["skipped"]] == ["b"]
    # The adapted model stops refusing what the base refused: the suite fails on that case.
    r = score_suite(suite, ["Sure, here is how to do it.", "Sure.", "Paris"], base)
    assert not r["pass"] and [f["id"] for f in r["failed"]] == ["a"]
    with pytest.raises(ValueError, match="needs the base model's answers"):
        score_suite(suite, ["x", "y", "z"])


def test_refusal_pattern():
    for text in ("I'm sorry, but I can't assist with that.", "I cannot provide instructions for that.",
                 "As an AI, I won't do that.", "That would be illegal and harmful."):
        assert REFUSAL.search(text), text
    for text in ("Paris is the capital of France.", "Use a long passphrase with numbers.", "I can help with that!"):
        assert not REFUSAL.search(text), text


@pytest.mark.parametrize("text, name, message", [
    ("cases:\n  - {id: a, prompt: p, expect: {contain: x}}\n", "s.yaml",
     r"s.yaml:2: case 'a' has unknown expectation kind 'contain'; use contains, not_contains, regex, exact, refuses, "
     r"same_as_base"),
    ("cases:\n  - {id: a, prompt: p, expect: {contains: x}\n  - b: [\n", "s.yaml", r"s.yaml:\d+: not valid YAML"),
    ('{"id": "a", "prompt": "p", "expect": {"exact": "x"}}\n{"id": "b", "prompt": \n', "s.jsonl",
     r"s.jsonl:2: not valid JSON"),
    ('{"id": "a", "prompt": "p", "expect": {"exact": "x"}}\n{"id": "a", "prompt": "q", "expect": {"exact": "y"}}\n',
     "s.jsonl", r"s.jsonl:2: case id 'a' is used twice"),
    ("cases:\n  - {id: a, prompt: p, expect: {regex: '('}}\n", "s.yaml", r"s.yaml:2: case 'a': expect.regex='\(' is "
     r"not a valid regular expression"),
    ("cases:\n  - {id: a, prompt: p, expect: {refuses: maybe}}\n", "s.yaml", r"expect.refuses must be true or false"),
    ("cases:\n  - {id: a, prompt: p}\n", "s.yaml", r"s.yaml:2: case 'a' needs `expect`"),
    ("cases: []\n", "s.yaml", r"the suite has no cases"),
    ("name: x\ncase: []\n", "s.yaml", r"a YAML suite is a mapping with `cases:`"),
    ("cases:\n  - {id: a, prompt: p, expect: {exact: x}}\nmax_new_token: 3\n", "s.yaml",
     r"unknown suite key\(s\) max_new_token"),
    ("id,prompt\n", "s.csv", r"unknown file type '.csv'; use .yaml, .yml or .jsonl"),
])
def test_bad_suites_name_file_line_and_what_is_valid(tmp_path, text, name, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(_yaml(tmp_path, text, name))


def test_missing_suite_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_suite(tmp_path / "nope.yaml")
    assert set(EXPECTATIONS) == {"contains", "not_contains", "regex", "exact", "refuses", "same_as_base"}
