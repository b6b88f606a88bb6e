"""`nemo-adapt eval`: prompt-only baselines (zero-shot and k-shot, the best chosen), a model without an adapter,
every metric with its interval, provenance, and bad input refused before a model is loaded."""

import hashlib
import json
from pathlib import Path

import pytest

from nemo_adapt.cli import main
from nemo_adapt.config import load_recipe
from tests.conftest import write_tiny_chat_data, write_tiny_recipe

pytestmark = pytest.mark.megatron


def test_baselines_zero_and_k_shot_with_metrics_and_provenance(tiny_run_dir, capsys):
    assert main(["eval", str(tiny_run_dir), "--baseline", "--few-shot", "2"]) == 0
    out = capsys.readouterr().out
    written = json.loads((tiny_run_dir / "eval_baseline.json").read_text())
    assert set(written) in ({"baseline", "baseline_2shot"}, {"baseline", "baseline_0shot"})
    other = next(k for k in written if k != "baseline")
    best, alt = written["baseline"], written[other]
    assert {best["shots"], alt["shots"]} == {0, 2}
    # The best by eval.metric (exact match here); on a tie the one with fewer shots.
    assert (best["exact_match"], -best["shots"]) >= (alt["exact_match"], -alt["shots"])
    assert f"prompt-only baseline ({best['shots']}-shot) (best): exact match" in out
    for r in written.values():
        assert r["n"] == 6 and r["metrics"]["exact_match"]["value"] == r["exact_match"]
        em = r["metrics"]["exact_match"]
        assert em["low"] <= em["value"] <= em["high"]
        assert set(r["metrics"]) >= {"exact_match", "token_f1", "ci"}
        assert (tiny_run_dir / f"predictions_eval_{'baseline' if r is best else other}.jsonl").is_file()
    p = best["provenance"]
    test = load_recipe(tiny_run_dir / "config.yaml").data.test
    assert p["test_sha256"] == hashlib.sha256(Path(test).read_bytes()).hexdigest()
    assert p["instructions"] == "full" and p["generation"]["max_new_tokens"] == 5
    assert len(p["chat_template_sha256"]) == 64 and p["model"]["fingerprint"].startswith("tiny_llama@")
    assert p["code_version"].startswith("0.1.0")
    # The k-shot prompts hold the worked examples: longer than the zero-shot ones.
    by_shots = {r["shots"]: r for r in written.values()}
    assert by_shots[2]["prompt_tokens_mean"] > by_shots[0]["prompt_tokens_mean"]


def test_a_model_without_an_adapter(tiny_run_dir, tmp_path, capsys):
    from nemo_adapt.models.loader import resolve_path

    base = resolve_path("random:tiny_llama")
    assert main(["eval", str(tiny_run_dir), "--model", str(base)]) == 0
    digest = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:8]
    written = json.loads((tiny_run_dir / f"eval_model_{base.name}-{digest}.json").read_text())
    assert written["label"] == "model" and written["model"] == str(base) and written["n"] == 6
    assert written["provenance"]["adapter"] is None and written["provenance"]["instructions"] == "adapter"
    assert "model: exact match" in capsys.readouterr().out
    # The provenance states the examples this result was scored on, as asked on the command line.
    assert main(["eval", str(tiny_run_dir), "--model", str(base), "--max-examples", "3"]) == 0
    written = json.loads((tiny_run_dir / f"eval_model_{base.name}-{digest}.json").read_text())
    assert written["n"] == 3 and written["provenance"]["generation"]["max_examples"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "--few-shot", "500"], "eval.baseline_few_shot=500 asks for more worked examples than the 96"),
    (["--baseline", "--few-shot", "-1"], "--few-shot=-1: the number of worked examples must be 0 or more"),
    (["--few-shot", "2"], "--few-shot applies to --baseline"),
])
def test_bad_input_is_refused_before_a_model_is_loaded(tiny_run_dir, capsys, argv, message):
    assert main(["eval", str(tiny_run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(tiny_run_dir.glob("eval*.json"))


def test_adapter_and_model_together_are_refused(tiny_run_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", str(tiny_run_dir), "--adapter", "a", "--model", "b"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_per_field_metric_on_free_text_answers_is_refused_before_training(tmp_path, monkeypatch):
    from nemo_adapt.errors import ConfigError
    from nemo_adapt.models.loader import open_source
    from nemo_adapt.training.preflight import check_test_split

    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    data = write_tiny_chat_data(tmp_path / "data")
    cfg = load_recipe(write_tiny_recipe(tmp_path, data, eval={"enabled": True, "metric": "field_accuracy"}))
    with pytest.raises(ConfigError, match=r"eval.metric=field_accuracy, but the answers of .*test.jsonl are not "
                                          r"`key: value` fields .*e.g. '[A-H]{4}' is not"):
        check_test_split(cfg, open_source("random:tiny_llama", "tiny_llama"), announce=False)
    with pytest.raises(ConfigError, match="eval.metric='bleu'"):
        load_recipe(write_tiny_recipe(tmp_path, data, eval={"metric": "bleu"}))
