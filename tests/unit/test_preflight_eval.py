"""Everything evaluation reads after training is checked before training: the test split's records,
the room eval.max_new_tokens leaves, and prompts over the model's context (named, with the training
data's over-length policy applied and counted)."""

import json

import pytest

from nemo_adapt.data.formats import DataError
from nemo_adapt.errors import ConfigError
from tests.conftest import write_tiny_chat_data, write_tiny_recipe


@pytest.fixture
def long_test(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    data = write_tiny_chat_data(tmp_path / "data", rows=16)
    lines = data["test"].read_text().splitlines()
    # Line 2: a question of 300 characters = 300+ tokens of the character tokenizer (context 256).
    lines[1] = json.dumps({"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "X"}]})
    data["test"].write_text("\n".join(lines) + "\n")
    return data


def _cfg(tmp_path, paths, **sections):
    from nemo_adapt.config import load_recipe

    sections.setdefault("eval", {})
    sections["eval"] = {"enabled": True, "max_new_tokens": 8, **sections["eval"]}
    recipe = write_tiny_recipe(tmp_path, paths, **{k: v for k, v in sections.items() if k != "data"})
    return load_recipe(recipe, [f"data.{k}={v}" for k, v in sections.get("data", {}).items()])


def _preflight(cfg):
    from nemo_adapt.training.main import preflight

    return preflight(cfg, 1)


def test_over_long_test_prompt_is_named_before_training_and_truncated(tmp_path, long_test, capsys):
    from nemo_adapt.models.loader import open_source
    from nemo_adapt.training.preflight import check_test_split

    cfg = _cfg(tmp_path, long_test)
    _preflight(cfg)
    out = capsys.readouterr().out
    assert f"{long_test['test']}:2 (" in out and "truncated to their last 248 tokens" in out
    reports = check_test_split(cfg, open_source("random:tiny_llama"), announce=False)
    assert reports["adapted"]["truncated"] == 1 and reports["adapted"]["dropped"] == 0
    assert reports["adapted"]["budget"] == 256 - 8
    assert reports["baseline"]["truncated"] == 1  # the baseline's prompt is as long


def test_drop_policy_drops_and_refuses_when_nothing_fits(tmp_path, long_test):
    from nemo_adapt.models.loader import open_source
    from nemo_adapt.training.preflight import check_test_split

    cfg = _cfg(tmp_path, long_test, data={"over_length": "drop"})
    assert check_test_split(cfg, open_source("random:tiny_llama"), announce=False)["adapted"]["dropped"] == 1
    only_long = tmp_path / "only_long.jsonl"
    only_long.write_text(long_test["test"].read_text().splitlines()[1] + "\n")
    cfg = _cfg(tmp_path, {**long_test, "test": only_long}, data={"over_length": "drop"})
    with pytest.raises(ConfigError, match=rf"no prompt of data.test fits.*{only_long}:1 \("):
        _preflight(cfg)


def test_generation_budget_larger_than_the_context_is_refused_before_training(tmp_path, long_test):
    cfg = _cfg(tmp_path, long_test, eval={"max_new_tokens": 256})
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=256 leaves no room for a prompt in the model's "
                                          r"context of 256 tokens"):
        _preflight(cfg)


def test_a_bad_test_record_is_named_before_training(tmp_path, long_test):
    lines = long_test["test"].read_text().splitlines()
    lines[2] = '{"messages": [}'
    long_test["test"].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{long_test['test']}:3: "):
        _preflight(_cfg(tmp_path, long_test))


def test_fit_prompts_keeps_the_end_of_a_truncated_prompt():
    from types import SimpleNamespace

    from nemo_adapt.eval.runner import fit_prompts

    recs = [SimpleNamespace(path="t.jsonl", line=i + 1) for i in range(3)]
    keep, prompts, report = fit_prompts([[1, 2, 3], list(range(10)), [4]], recs, 4, "truncate")
    assert keep == [0, 1, 2] and prompts[1] == [6, 7, 8, 9]
    assert report["over_length"] == ["t.jsonl:2 (10 tokens)"] and report["truncated"] == 1
    keep, prompts, report = fit_prompts([[1, 2, 3], list(range(10)), [4]], recs, 4, "drop")
    assert keep == [0, 2] and prompts == [[1, 2, 3], [4]] and report["dropped"] == 1


def test_more_few_shot_examples_than_training_records_is_refused_before_training(tmp_path, long_test):
    with pytest.raises(ConfigError, match=r"eval.baseline_few_shot=17 asks for more worked examples than the 16"):
        _preflight(_cfg(tmp_path, long_test, eval={"baseline_few_shot": 17}))
