"""Gates files: every mistake named with file:line, and each gate judged on the right end of its interval, on the
baseline of the same test file, and on the dataset as it is now. The shipped gates files load."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_adapt.artifacts.gates import Evidence, check_gates, load_gates
from nemo_adapt.errors import ConfigError
from tests.registry_helpers import baseline_result, eval_result, write_gates, write_test_file

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, message", [
    ("gates: []\n", ":1: `gates` must be a non-empty list"),
    ("gate:\n  - {metric: exact_match, min: 0.5}\n", ":1: unknown key(s) gate; allowed: name, description, gates"),
    ("gates:\n  - {metric: exact_match, min: 0.5, max: 0.9}\n", ":2: metric exact_match takes exactly one of min, "
                                                                 "min_over_baseline"),
    ("gates:\n  - {metric: forgetting, min: 0.5}\n", ":2: metric forgetting takes exactly one of max (judged on: "
                                                      "95% upper bound), got min"),
    ("gates:\n  - {metric: exact_match, min: 75}\n", ":2: exact_match min=75.0 must be within [0, 1]"),
    ("gates:\n  - {metric: exact_match, min: '0.7'}\n", ":2: min must be a finite number, got '0.7'"),
    ("gates:\n  - {metric: examples, min: 2.5}\n", ":2: examples min=2.5 must be a whole number"),
    ("gates:\n  - {metric: latency, max: 0.5}\n", ":2: metric 'latency' does not exist; did you mean "
                                                   "'latency_overhead'?"),
    ("gates:\n  - {suites: safety}\n", ":2: suites must be a non-empty list of suite names"),
    ("gates:\n  - {dataset: newest}\n", ":2: dataset must be `current`"),
    ("gates:\n  - {metric: exact_match, suites: [a], min: 0.1}\n", ":2: a gate names exactly one of metric, suites "
                                                                     "or dataset"),
    ("gates:\n  - {metric: exact_match, min: 0.5}\n  - {metric: token_f1, min: 0.5, min: 0.6}\n",
     ":3: key 'min' is given twice"),
    ("gates:\n  - {metric: exact_match, min: 0.5\n", ": not valid YAML"),
])
def test_mistakes_are_named_with_file_and_line(tmp_path, text, message):
    path = write_gates(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_gates(path)
    assert f"{path}{message}" in str(err.value) or message in str(err.value), str(err.value)
    assert str(path) in str(err.value)


def test_the_shipped_gates_files_load():
    for path in sorted((REPO / "gates").glob("*.yaml")):
        gates = load_gates(path)
        assert gates.gates and gates.name == path.stem, path
        assert path.read_text().startswith("#"), f"{path}: the header says what it gates and how to run it"


def test_each_gate_reads_the_right_end_and_the_same_test_file(tmp_path):
    test = write_test_file(tmp_path)
    gates = load_gates(write_gates(tmp_path, """gates:
  - {metric: field_accuracy, min: 0.79}
  - {metric: field_accuracy.priority, min: 0.75}
  - {metric: exact_match, min_over_baseline: 0.05}
  - {metric: forgetting, max: 0.25}
  - {metric: latency_overhead_merged, max: 0.1}
  - {metric: artifact_mib, max: 1}
  - {metric: examples, min: 200}
  - {dataset: current}
  - {dataset: {test_sha256: %s}}
""" % ("ab" * 32)))
    result = eval_result(test, "a" * 64)
    got = {(g.line, g.gate): g for g in check_gates(gates, Evidence(result, baseline_result(test)["baseline"], 2**19))}
    verdicts = [g.passed for g in got.values()]
    # field_accuracy is the mean over fields: lower bounds (0.86 + 0.74) / 2 = 0.80 >= 0.79; priority alone 0.74.
    assert verdicts == [True, False, True, False, False, True, True, True, False]
    by_line = {line: g for (line, _), g in got.items()}
    assert by_line[2].value.startswith("0.800") and by_line[3].value.startswith("0.740")
    assert by_line[4].value.startswith("+0.700  (0.800 - 0.100 2-shot)")
    assert by_line[5].value.startswith("+0.300 nats/token")  # the upper bound, not the value 0.2
    assert by_line[6].value.startswith("not measured")  # no merged measurement recorded
    assert by_line[7].value == "0.5 MiB"

    # The baseline of another test file does not count; a changed test file fails `dataset: current`.
    other = write_test_file(tmp_path / "other", "c\n")
    results = check_gates(gates, Evidence(result, baseline_result(other)["baseline"], 0))
    assert not results[2].passed and "baseline evaluated on another test file" in results[2].value
    test.write_text("a\nb\nc\n")
    results = check_gates(gates, Evidence(result, None, 0))
    assert not results[7].passed and results[7].threshold.endswith("now)")
    assert "no prompt-only baseline recorded" in results[2].value

    # A version without an evaluation fails every gate but its size.
    results = check_gates(gates, Evidence(None, None, 2**19))
    assert [g.passed for g in results] == [False] * 5 + [True] + [False] * 3
