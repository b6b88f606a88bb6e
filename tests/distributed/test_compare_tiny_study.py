"""`nemo-adapt compare recipes/studies/tiny_cpu.yaml`, the shipped CI study, end to end: every column present
and sane, the reports written, and a rerun that trains only the candidate whose run did not finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "recipes" / "studies" / "tiny_cpu.yaml"

pytestmark = pytest.mark.slow


def _compare(out: Path, cache_env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nemo_adapt.cli", "compare", str(STUDY), "--out", str(out)],
                          cwd=REPO, env={**os.environ, **cache_env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_tiny_study_fills_every_column_and_resumes_without_retraining(tmp_path, cache_env):
    out = tmp_path / "study"
    first = _compare(out, cache_env)
    matrix = json.loads((out / "matrix.json").read_text())
    rows = {r["name"]: r for r in matrix["rows"]}
    assert list(rows) == ["prompt_only", "lora", "prompt_tuning", "prefix_tuning", "full"]
    for r in rows.values():
        s = r["score"]
        assert 0.0 <= s["low"] <= s["value"] <= s["high"] <= 1.0, r["name"]
        assert r["n"] == 16 and r["suites"]["tiny_upper"]["checked"] == 4
        f = r["forgetting"]
        assert f["low"] <= f["value"] <= f["high"], r["name"]
        inf = r["inference"]["as_evaluated"]
        assert inf["ttft_s"] > 0 and set(inf["decode_tokens_per_s"]) == {"1", "8"}
        assert r["context_tokens"] > 0 and r["latency_overhead"] is not None
        assert r["provenance"]["test_sha256"] == matrix["dataset"]["sha256"]["test"]

    base = rows["prompt_only"]
    assert base["trainable_params"] == 0 and base["train_wall_s"] == 0 and base["gpu_hours"] == 0
    assert base["artifact_bytes"] == 0 and base["forgetting"]["value"] == 0
    assert base["shots"] in (0, 2) and len(base["alternatives"]) == 1  # zero-shot and 2-shot both scored
    full = rows["full"]
    assert full["kind"] == "full" and full["trainable_params"] == full["base_params"]  # every weight trains
    assert full["artifact_bytes"] > 4 * full["base_params"]  # model/: every weight in float32 (+ config)
    lora = rows["lora"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] and lora["merges_into_base"]
    assert lora["latency_overhead_merged"] is not None and "merged" in lora["inference"]
    # Virtual tokens and prefixes lengthen the attended context (4 each in the study).
    assert rows["prompt_tuning"]["context_tokens"] == lora["context_tokens"] + 4
    assert rows["prefix_tuning"]["context_tokens"] == lora["context_tokens"] + 4
    for name in ("lora", "prompt_tuning", "prefix_tuning", "full"):
        r = rows[name]
        assert r["train_wall_s"] > 0 and r["train_tokens_per_s"] > 0 and r["steps"] == 8
        assert 0 < r["gpu_hours"] < 1e-3 and r["gpu_hours_detail"]["gpu"] == "h100-80gb"
        assert r["peak_train_memory_gib"] > 0 and r["artifact_bytes"] > 0

    assert [s["scenario"]["name"] for s in matrix["scenarios"]] == ["one_variant", "many_variants"]
    for s in matrix["scenarios"]:
        assert set(s["verdicts"]) == set(rows)
        assert s["recommendation"] is None or s["verdicts"][s["recommendation"]]["pass"]
    trained = [r for r in rows.values() if r["kind"] != "baseline"]
    assert matrix["compute_s"] >= sum(r["train_wall_s"] + r["eval_wall_s"] for r in trained)
    report = (out / "report.md").read_text()
    assert "| candidate | method |" in report and "## Scenarios" in report and "**one_variant**" in report
    assert "training and evaluation " in report and " in all, this invocation " in report
    assert "| 0 (the base) |" in report  # the baseline's forgetting and overhead are zero by definition
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 3 and "Quality vs trainable parameters" in html
    assert "min_gain=" in html and "<h2>Columns</h2>" in html and matrix["dataset"]["sha256"]["test"][:12] in html
    assert "[5/5] full: training" in first.stdout and " left" in first.stdout  # which candidate, and an ETA

    # A candidate whose run did not finish (here: its results removed) is trained again; the others are reused
    # as they are — their logs do not grow and their evaluations are not redone.
    logs = {n: (out / "logs" / f"{n}.log").read_text() for n in ("lora", "prompt_tuning", "prefix_tuning")}
    state = json.loads((out / "study_state.json").read_text())["candidates"]
    (out / "full" / "results.json").unlink()
    second = _compare(out, cache_env)
    assert "full: training" in second.stdout
    assert not any(f"{n}: training" in second.stdout for n in logs)
    assert {n: (out / "logs" / f"{n}.log").read_text() for n in logs} == logs
    after = json.loads((out / "study_state.json").read_text())["candidates"]
    for n in ("prompt_only", *logs):
        assert after[n]["eval_key"] == state[n]["eval_key"] and after[n]["eval_wall_s"] == state[n]["eval_wall_s"]
    assert after["full"]["train_wall_s"] > state["full"]["train_wall_s"]
