"""`nemo-adapt compare`: study files refused with file:line before anything runs, and the scenario judge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nemo_adapt.errors import ConfigError
from nemo_adapt.eval.compare import compare, judge, serving_bytes
from nemo_adapt.eval.study import Scenario, check_candidates, load_study

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "studies" / "tiny_cpu.yaml"


@pytest.fixture()
def study_dir(tmp_path, monkeypatch):
    """A copy of the shipped tiny study and its inputs in tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    for rel in ("datasets/tiny_upper", "recipes/tiny_llama_lora_cpu.yaml", "suites/tiny_upper.yaml",
                "datasets/general/heldout.jsonl", "recipes/studies/tiny_cpu.yaml"):
        src, dst = REPO / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return path


def test_the_shipped_studies_load_and_every_candidate_uses_the_dataset_version(tmp_path):
    for path in sorted((REPO / "recipes" / "studies").glob("*.yaml")):
        study = load_study(path)
        assert study.candidates and sum(c.baseline for c in study.candidates) == 1, path
        checked = check_candidates(study, tmp_path / path.stem)
        assert set(checked) == {c.name for c in study.candidates}
        assert len(study.dataset.fingerprint) == 64


def test_a_candidate_on_another_data_version_is_refused_before_anything_runs(study_dir):
    other = study_dir / "other_train.jsonl"
    lines = (study_dir / "datasets/tiny_upper/train.jsonl").read_text().splitlines()
    other.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer: same path shape, other content
    study = _edit(study_dir / "recipes/studies/tiny_cpu.yaml", "  - {name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml}",
                  f"  - {{name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml, overrides: [data.train={other}]}}")
    line = next(i for i, s in enumerate(study.read_text().splitlines(), 1) if "name: lora" in s)
    with pytest.raises(ConfigError) as err:
        compare(study, study_dir / "out")
    msg = str(err.value)
    assert msg.startswith(f"{study}:{line}: candidate 'lora': data.train=") and "other_train.jsonl" in msg
    assert "is not the study's dataset 'tiny_upper-v1'" in msg and "sha256" in msg
    assert not (study_dir / "out").exists()  # nothing written, nothing trained


@pytest.mark.parametrize("old,new,expected", [
    ("  few_shot: 2\n", "  few_shot: 500\n", "evaluation.few_shot=500 asks for more worked examples than the 96"),
    ("budget: {max_steps: 8}", "budget: {max_step: 8}", ":12: unknown budget key(s) max_step; allowed: max_steps"),
    ("  latency_tokens: 32\n", "  latency_tokens: 1\n", "evaluation.latency_tokens=1"),
    ("    suites: [tiny_upper]\n", "    suites: [safety]\n", "requires suite(s) safety that evaluation.suites does not run"),
    ("    prefer: cost\n", "    prefer: speed\n", "prefer='speed'; allowed: cost, quality"),
    ("  - {name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml}\n",
     "  - {name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml}\n  - {name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml}\n",
     "candidate name 'lora' is used twice"),
    ("recipe: recipes/tiny_llama_lora_cpu.yaml, peft: {method: none}",
     "recipe: recipes/tiny_llama_lora_cpu.yaml, peft: {method: lorax}", "candidate 'full': "),
    ("target: {gpu: h100-80gb,", "target: {gpu: h999,", "target.gpu='h999'"),
    ("dataset:\n", "dataset:\n  text: x.jsonl\n", "unknown dataset key(s) text"),
    ("  - {name: lora, recipe:", "  - {name: logs, recipe:", "candidate name='logs' must be"),
    ("  - {name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml}",
     "  - {name: lora, recipe: recipes/tiny_llama_lora_cpu.yaml, overrides: [run.max_steps=3]}",
     "sets run.max_steps, but the study's budget.max_steps=8"),
    ("  - name: many_variants\n", "  - name: one_variant\n", "scenario name 'one_variant' is used twice"),
    ("    min_gain: 0.0\n", "    min_gain: 0.0\n    min_quality: 1.5\n", "min_quality=1.5; task metrics lie in [0, 1]"),
    ("    min_gain: 0.0\n", "    min_gain: .nan\n", "min_gain=nan must be a finite number"),
    ("    min_gain: 0.0\n", "    min_gain: [1]\n", "min_gain must be a number"),
    ("    variants: 16\n", "    variants: 16\n    variants: 4\n", "key 'variants' is given twice"),
    ("run.log_interval=1]", "run.log_intervall=1]", "overrides (applied to every candidate; here to 'prompt_only'"),
])
def test_bad_study_values_are_refused_with_where_and_what_is_allowed(study_dir, old, new, expected):
    study = _edit(study_dir / "recipes/studies/tiny_cpu.yaml", old, new)
    with pytest.raises(ConfigError) as err:
        compare(study, study_dir / "out")
    assert expected in str(err.value) and str(err.value).startswith(str(study) if "target" not in expected else "")
    assert not (study_dir / "out").exists()


def test_a_suite_that_is_not_valid_yaml_or_has_an_unknown_kind_is_named_with_its_line(study_dir):
    suite = study_dir / "suites/tiny_upper.yaml"
    _edit(suite, "expect: {exact: HGFE}", "expect: {exactly: HGFE}")
    with pytest.raises(ConfigError, match=r"tiny_upper.yaml:\d+: case 'hgfe' has unknown expectation kind 'exactly'"):
        compare(study_dir / "recipes/studies/tiny_cpu.yaml", study_dir / "out")
    suite.write_text("cases:\n  - {id: a, prompt: b\n")
    with pytest.raises(ConfigError, match=r"tiny_upper.yaml:\d+: not valid YAML"):
        compare(study_dir / "recipes/studies/tiny_cpu.yaml", study_dir / "out")


def test_a_study_that_is_not_valid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\ncandidates:\n  - {name: a\n")
    with pytest.raises(ConfigError, match=r"s.yaml:\d+: not valid YAML"):
        load_study(bad)


def _row(name, kind, value, low, high, *, params=1000, artifact=4000, overhead=0.1, merged=None, hours=1.0,
         forgetting=0.0, suites=True, base_bytes=10**6):
    return {"name": name, "kind": kind, "metric": "exact_match", "score": {"value": value, "low": low, "high": high},
            "trainable_params": params, "artifact_bytes": artifact, "latency_overhead": overhead,
            "latency_overhead_merged": merged, "gpu_hours": hours, "base_bytes": base_bytes,
            "merges_into_base": merged is not None,
            "forgetting": {"value": forgetting, "low": forgetting - 0.1, "high": forgetting + 0.1},
            "suites": {"safety": {"pass": suites, "passed": 5 if suites else 3, "checked": 5}}}


ROWS = [
    _row("prompt", "baseline", 0.30, 0.25, 0.35, params=0, artifact=0, overhead=0.0, hours=0.0),
    _row("lora", "peft", 0.80, 0.75, 0.85, overhead=0.2, merged=0.0, hours=0.5),
    _row("ia3", "peft", 0.78, 0.72, 0.84, params=100, artifact=400, overhead=0.05, merged=0.0, hours=0.4),
    _row("full", "full", 0.82, 0.77, 0.87, params=10**6, artifact=10**6, overhead=0.0, hours=3.0, forgetting=0.8),
    _row("prefix", "peft", 0.60, 0.52, 0.68, overhead=0.6, suites=False),
]


def test_prefer_quality_takes_the_cheapest_within_the_best_interval_and_lists_failed_gates():
    s = Scenario("regulated", min_gain=0.3, max_latency_overhead=0.5, variants=1, max_forgetting=0.5,
                 suites=("safety",), prefer="quality")
    out = judge(s, ROWS)
    # full is best (0.82) but forgets too much; lora (0.80) and ia3 (0.78 high 0.84 >= lora's low) tie; ia3 is cheaper.
    assert out["recommendation"] == "ia3", out
    v = out["verdicts"]
    assert not v["full"]["pass"] and "forgetting upper bound +0.900 > 0.5" in v["full"]["failed"][0]
    assert not v["prompt"]["pass"] and "cannot gain" in v["prompt"]["failed"][0]
    assert set(v["prefix"]["failed"]) >= {"latency overhead +60% > 50%", "suite safety failed (3/5)"}
    assert "lower bound 0.520 < baseline 0.300 + 0.3" in " ".join(v["prefix"]["failed"])


def test_many_variants_serve_unmerged_and_budget_counts_every_variant():
    s = Scenario("per_customer", variants=16, max_latency_overhead=0.1, gpu_hours=10.0, prefer="cost")
    out = judge(s, ROWS)
    v = out["verdicts"]
    assert "latency overhead +20% > 10%" in v["lora"]["failed"]  # 16 variants: unmerged, not the merged 0%
    assert "16 variant(s) x 3 GPU-h > budget 10.0" in v["full"]["failed"]
    assert v["ia3"]["pass"] and v["prompt"]["pass"]
    assert out["recommendation"] == "prompt"  # prefer cost: the base alone is cheapest to serve
    assert serving_bytes(ROWS[2], 16) == 10**6 + 16 * 400
    assert serving_bytes(ROWS[3], 16) == 16 * 10**6
    assert serving_bytes(ROWS[1], 1) == 10**6  # one variant of a folding method is served merged


def test_no_candidate_meeting_the_gates_says_so():
    out = judge(Scenario("impossible", min_quality=0.99), ROWS)
    assert out["recommendation"] is None and all(not v["pass"] for v in out["verdicts"].values())


def test_an_output_directory_of_another_kind_is_refused_before_any_work(study_dir):
    study = study_dir / "recipes/studies/tiny_cpu.yaml"
    (study_dir / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file; the study writes a directory there"):
        compare(study, study_dir / "afile")
    (study_dir / "notes").mkdir()
    (study_dir / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty and holds no study"):
        compare(study, study_dir / "notes")
    (study_dir / "other").mkdir()
    (study_dir / "other" / "study_state.json").write_text('{"study": "triage", "candidates": {}}')
    with pytest.raises(ConfigError, match="holds study 'triage', not 'tiny_cpu'"):
        compare(study, study_dir / "other")
    assert sorted(p.name for p in (study_dir / "notes").iterdir()) == ["todo.txt"]


def test_an_empty_test_split_is_refused_before_training(study_dir):
    (study_dir / "datasets/tiny_upper/test.jsonl").write_text("")
    with pytest.raises(ConfigError, match="test.jsonl"):  # the study's own hash check reads it first
        compare(study_dir / "recipes/studies/tiny_cpu.yaml", study_dir / "out")
    assert not (study_dir / "out").exists()
