"""bench/peft_table.py: collection from run directories, table formatting, README markers, failures.

Run directories are fabricated here (results.json, metrics.jsonl, config.yaml as `nemo-adapt run`
writes them); no training runs.
"""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("peft_table", REPO / "bench" / "peft_table.py")
pt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pt)

README = """# proj

## Two commands

```bash
# a comment inside a fence is not a heading
scripts/demo.sh
```

### The main job

Text about the job.

| | exact match |
|---|---|
| baseline | 0.000 |

## What works today

More text.
"""


def make_run(root: Path, method: str, *, em=0.25, n=8, tps=(50.0, 100.0, 120.0, 110.0), peaks=(1.0, 1.5, 1.25, 1.4),
             baseline=None, adapter_bytes=1000, step=None, total=None, exit_code=0, write_results=True) -> Path:
    run = root / method
    run.mkdir(parents=True)
    steps = len(tps)
    lines = [json.dumps({"step": 0, "time": 0.0, "event": "started"})]
    for i, (t, p) in enumerate(zip(tps, peaks), start=1):
        lines.append(json.dumps({"step": i, "time": float(i), "train/loss": 1.0, "train/tokens_per_s": t,
                                 "train/peak_memory_gib": p}))
    lines.append(json.dumps({"step": steps, "time": 9.0, "val/loss": 0.5}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "config.yaml").write_text(f"run:\n  max_steps: {steps}\ntrain:\n  global_batch_size: 8\n"
                                     "data:\n  seq_length: 512\n  packing: true\noptim:\n  lr: 0.001\n"
                                     "eval:\n  max_examples: null\n")
    if write_results:
        ev = {"adapted": {"exact_match": em, "correct": round(em * n), "n": n, "label": "adapted"}}
        if baseline is not None:
            ev["baseline"] = {"exact_match": baseline, "correct": round(baseline * n), "n": n, "label": "b"}
        (run / "results.json").write_text(json.dumps({
            "step": steps if step is None else step, "total_steps": steps if total is None else total,
            "exit_code": exit_code, "tokens_seen": 4096 * steps, "trainable_params": 4_063_232,
            "base_params": 134_515_008, "checkpoint": "step_00000004", "checkpoint_bytes": 3 * 2**20,
            "adapter_bytes": adapter_bytes, "eval": ev}))
    return run


def test_collect_median_excludes_first_step_and_max_memory(tmp_path):
    row = pt.collect_run("lora", make_run(tmp_path, "lora", baseline=0.0), wall_s=125.0)
    assert row["status"] == "ok"
    assert row["tokens_per_s"] == 110.0  # median of 100, 120, 110: step 1's 50 left out
    assert row["tokens_per_s_steps"] == 3 and not row["tokens_per_s_first_step_only"]
    assert row["peak_memory_gib"] == 1.5
    assert row["exact_match"] == 0.25 and (row["correct"], row["n"]) == (2, 8)
    assert row["baseline"]["exact_match"] == 0.0
    assert row["budget"]["steps"] == 4 and row["budget"]["packing"] is True


def test_single_step_run_is_marked_not_hidden(tmp_path):
    row = pt.collect_run("ia3", make_run(tmp_path, "ia3", tps=(42.0,), peaks=(2.0,)))
    assert row["status"] == "ok" and row["tokens_per_s"] == 42.0 and row["tokens_per_s_first_step_only"]
    assert "(step 1 only)" in pt.format_row(row)[5]


def test_table_parses_back(tmp_path):
    rows = [pt.collect_run("lora", make_run(tmp_path, "lora", baseline=0.125), wall_s=65.0),
            pt.collect_run("ia3", make_run(tmp_path, "ia3", em=0.5, adapter_bytes=3 * 2**20))]
    rows.append(pt.baseline_row(rows))
    table = pt.parse_table(pt.format_table(rows))
    assert [r["method"] for r in table] == ["prompt-only baseline", "lora", "ia3"]
    assert list(table[0]) == pt.COLUMNS
    base, lora, ia3 = table
    assert base["test exact match"] == "0.125 (1/8)" and base["trainable params"] == "0 (no training)"
    assert lora["test exact match"] == "0.250 (2/8)"
    assert lora["trainable params"] == "4.06 M (3.02%)"
    assert lora["resume checkpoint"] == "3.0 MiB" and ia3["adapter artifact"] == "3.0 MiB"
    assert lora["train tokens/s"] == "110.0" and lora["peak memory"] == "1.50 GiB"
    assert lora["budget (steps x rows x seq, lr)"] == "4 x 8 x 512 packed, lr 0.001"
    assert lora["tokens seen"] == "16,384" and lora["wall"] == "1 min 05 s"


@pytest.mark.parametrize("kind", ["exit", "no_results", "early", "no_eval", "no_metrics"])
def test_failure_rows(tmp_path, kind):
    log = tmp_path / "logs" / "dora.log"
    if kind == "no_results":
        run = make_run(tmp_path, "dora", write_results=False)
    elif kind == "early":
        run = make_run(tmp_path, "dora", step=2, total=4, exit_code=75)
    else:
        run = make_run(tmp_path, "dora")
    if kind == "no_eval":
        res = json.loads((run / "results.json").read_text())
        res["eval"] = {}
        (run / "results.json").write_text(json.dumps(res))
    if kind == "no_metrics":
        (run / "metrics.jsonl").write_text("")
    row = pt.collect_run("dora", run, log, returncode=1 if kind == "exit" else 0)
    assert row["status"] == "failed" and row["reason"]
    cells = pt.format_row(row)
    assert cells[0] == "dora" and "**failed**" in cells[1] and str(log) in cells[1]
    parsed = pt.parse_table(pt.format_table([row]))
    assert "failed" in parsed[0]["test exact match"]


def test_baseline_row_when_lora_failed_or_absent(tmp_path):
    failed = {"method": "lora", "status": "failed", "reason": "x", "log": "/l/lora.log"}
    assert pt.baseline_row([failed])["status"] == "failed"
    assert pt.baseline_row([])["status"] == "missing"


def test_marker_insertion_and_idempotence():
    once = pt.replace_block(README, "table v1")
    assert once.count(pt.START) == once.count(pt.END) == 1 and once.count(pt.TABLE_HEADING) == 1
    # inserted at the end of the main-job section, before the next section; fenced '#' ignored
    assert once.index("| baseline | 0.000 |") < once.index(pt.TABLE_HEADING) < once.index("## What works today")
    assert pt.replace_block(once, "table v1") == once
    twice = pt.replace_block(once, "table v2")
    assert "table v2" in twice and "table v1" not in twice
    assert twice.replace("table v2", "table v1") == once
    # nothing outside the block changed
    assert once.replace(f"\n\n{pt.TABLE_HEADING}\n\n{pt.START}\ntable v1\n{pt.END}", "") == README


def test_bad_markers_are_errors():
    with pytest.raises(pt.TableError):
        pt.replace_block(README + f"\n{pt.START}\n", "x")
    with pytest.raises(pt.TableError):
        pt.replace_block(f"{pt.END}\n{pt.START}\n", "x")
    with pytest.raises(pt.TableError):
        pt.replace_block("# no main job section\n", "x")


def test_markers_restored_under_existing_heading():
    text = README.replace("## What works today", f"{pt.TABLE_HEADING}\n\n## What works today")
    out = pt.replace_block(text, "t")
    assert out.count(pt.TABLE_HEADING) == 1 and f"{pt.TABLE_HEADING}\n\n{pt.START}\nt\n{pt.END}" in out


def test_discovery_full_and_overrides(tmp_path):
    for m in ("lora", "ia3", "prompt_tuning"):
        (tmp_path / f"smollm2_135m_{m}.yaml").write_text(
            "run:\n  name: smollm2_135m_lora_triage\npeft:\n  method: lora\n  rank: 16\n")
    methods = pt.discover_methods(tmp_path)
    assert list(methods) == ["full", "lora", "ia3", "prompt_tuning"] and methods["full"] is None
    full = pt.derive_full_recipe(methods["lora"], tmp_path / "out" / "full.yaml")
    import yaml

    data = yaml.safe_load(full.read_text())
    assert data["peft"] == {"method": "none"} and data["run"]["name"] == "smollm2_135m_full_triage"
    over = pt.run_overrides("ia3", tmp_path / "r", 3, 5)
    assert "run.max_steps=3" in over and "eval.max_examples=5" in over and "eval.baseline=false" in over
    assert "eval.baseline=false" not in pt.run_overrides("lora", tmp_path / "r", None, None)


def test_clear_run_dir_refuses_foreign_directory(tmp_path):
    foreign = tmp_path / "lora"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(pt.TableError):
        pt.clear_run_dir(foreign)
    run = make_run(tmp_path, "ia3")
    pt.clear_run_dir(run)
    assert not run.exists()


def test_partial_rerun_keeps_rows_with_same_settings_only(tmp_path):
    old = {"date": "D0", "settings": {"steps": 2, "max_examples": None},
           "rows": [{"method": "dora", "status": "ok"}, {"method": "lora", "status": "ok"},
                    {"method": "baseline", "status": "ok"}]}
    methods = {"lora": None, "dora": None}
    new = [{"method": "lora", "status": "ok"}]
    kept = pt.merge_previous(list(new), old, {"steps": 2, "max_examples": None}, methods)
    assert [r["method"] for r in kept] == ["lora", "dora"] and kept[1]["reused_from"] == "D0"
    assert pt.merge_previous(list(new), old, {"steps": 3, "max_examples": None}, methods) == new


FAKE_CLI = '''#!{python}
"""Stand-in for `nemo-adapt run`: writes a run directory as the trainer does; 'dora' fails."""
import json, sys
from pathlib import Path
recipe = sys.argv[2]
over = dict(a.split("=", 1) for a in sys.argv[3:])
run = Path(over["run.output_dir"])
if "dora" in recipe:
    print("Traceback: boom", file=sys.stderr)
    sys.exit(1)
run.mkdir(parents=True)
steps = int(over.get("run.max_steps", 3))
(run / "config.yaml").write_text(f"run:\\n  max_steps: {{steps}}\\n")
recs = [{{"step": s, "time": 0.0, "train/tokens_per_s": 10.0 * s, "train/peak_memory_gib": 1.0 + s}}
        for s in range(1, steps + 1)]
(run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in recs))
ev = {{"adapted": {{"exact_match": 0.5, "correct": 2, "n": 4}}}}
if "eval.baseline=false" not in sys.argv:
    ev["baseline"] = {{"exact_match": 0.0, "correct": 0, "n": 4}}
(run / "results.json").write_text(json.dumps({{"step": steps, "total_steps": steps, "exit_code": 0,
    "tokens_seen": 100 * steps, "trainable_params": 1000, "base_params": 100000, "checkpoint_bytes": 2048,
    "adapter_bytes": 1024, "eval": ev}}))
'''


def test_main_end_to_end_with_stand_in_cli(tmp_path, capsys):
    import sys

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for m in ("lora", "ia3", "dora"):
        (recipes / f"smollm2_135m_{m}.yaml").write_text("run:\n  name: smollm2_135m_lora_triage\n")
    cli = tmp_path / "nemo-adapt"
    cli.write_text(FAKE_CLI.format(python=sys.executable))
    cli.chmod(0o755)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "out"
    common = ["--readme", str(readme), "--out", str(out), "--recipes", str(recipes), "--cli", str(cli),
              "--steps", "3"]

    assert pt.main([*common, "--only", "lora,ia3"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "peft_table.json").read_text())["rows"]}
    assert set(rows) == {"lora", "ia3", "baseline"}
    assert rows["lora"]["tokens_per_s"] == 25.0 and rows["lora"]["peak_memory_gib"] == 4.0
    assert rows["baseline"]["from"] == "lora" and rows["baseline"]["exact_match"] == 0.0
    text = readme.read_text()
    table = pt.parse_table(text.split(pt.START)[1])
    assert [r["method"] for r in table] == ["prompt-only baseline", "lora", "ia3"]
    assert "--steps 3" in text and "cores" in text

    # A failing method: a row with its log, the other rows kept (same settings), exit status 1.
    assert pt.main([*common, "--only", "dora"]) == 1
    rows = {r["method"]: r for r in json.loads((out / "peft_table.json").read_text())["rows"]}
    assert set(rows) == {"lora", "ia3", "dora", "baseline"}
    assert rows["dora"]["status"] == "failed" and rows["dora"]["log"].endswith("dora.log")
    assert "boom" in Path(rows["dora"]["log"]).read_text()
    assert rows["lora"]["reused_from"] and rows["baseline"]["status"] == "ok"
    text = readme.read_text()
    assert text.count(pt.START) == 1 and "**failed**" in text and "dora.log" in text
    assert "failed: dora" in capsys.readouterr().err
