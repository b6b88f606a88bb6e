"""A test record longer than the model's context is named before training and evaluated under the
training data's over-length policy: the run finishes with results, instead of failing after training."""

import json

import pytest

from tests.conftest import run_tiny as _run

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def test_over_long_test_record_is_named_first_and_evaluated_truncated(tmp_path, tiny_data, cache_env):
    test = tmp_path / "test.jsonl"
    lines = tiny_data["test"].read_text().splitlines()[:4]
    lines[1] = json.dumps({"messages": [{"role": "user", "content": "abcd" * 110},
                                        {"role": "assistant", "content": "ABCD"}]})
    test.write_text("\n".join(lines) + "\n")
    run_dir, proc = _run(tmp_path, "long", {**tiny_data, "test": test}, cache_env, run={"max_steps": 2},
                         eval={"enabled": True, "max_new_tokens": 8, "baseline": False})
    warning = f"{test}:2 ("
    assert warning in proc.stdout
    # named in preflight: before the first training step is logged
    assert proc.stdout.index(warning) < proc.stdout.index("train plan:")
    adapted = json.loads((run_dir / "results.json").read_text())["eval"]["adapted"]
    assert adapted["n"] == 4 and adapted["over_length"]["truncated"] == 1
    assert "1 prompt(s) truncated" in proc.stdout
