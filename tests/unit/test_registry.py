"""`nemo-adapt registry` on a local directory: add -> list/show/lineage, content addressing, verify, promote through
gates (refused with every failed gate listed, or moved with an audit entry), rollback, --force, merged models, and
each kind of bad input as one clear error."""

from __future__ import annotations

# ruff: noqa: F811 — tests take the `env` fixture imported from tests.registry_helpers
import json
import os
import re
from types import SimpleNamespace

from nemo_adapt.artifacts.registry import Registry, object_path
from tests.registry_helpers import (
    added_id,
    cli,
    env,  # noqa: F401 — the shared pytest fixture
    eval_result,
    sha256,
    write_gates,
    write_merged,
    write_run,
)


def test_add_then_list_show_lineage_and_the_same_content_is_the_same_version(env, capsys):
    code, out, _ = cli(capsys, "add", str(env.run_a))
    assert code == 0 and out.startswith("added triage:") and "run, lora adapter" in out
    vid = added_id(out)
    assert "exact_match 0.850 [0.800, 0.900] n=200" in out

    code, out, _ = cli(capsys, "list")
    assert code == 0 and re.search(rf"triage\s+{vid}\s+run\s+.*exact_match 0.850", out)

    code, out, _ = cli(capsys, "show", f"triage:{vid}")
    assert "base model  tiny_llama@0123456789abcdef" in out and "suite safety: pass (5/5" in out
    assert "adapter/adapter_model.safetensors" in out and "eval_baseline.json" in out
    manifest = json.loads(cli(capsys, "show", "triage", "--json")[1])
    assert manifest["kind"] == "run" and manifest["recipe"]["peft"]["rank"] == 4
    assert manifest["dataset"]["fingerprint"] == "d" * 64 and manifest["base_model"]["fingerprint"].startswith("tiny")
    assert manifest["evaluation"]["suites"]["safety"]["sha256"] == "5" * 64
    assert manifest["created"]["by"].count("@") == 1 and manifest["wandb"] is None

    code, out, _ = cli(capsys, "lineage", "triage:latest")
    assert code == 0 and "base model    tiny_llama@0123456789abcdef" in out and "recipe        lora on tiny_llama" in out

    # The same content again (even copied elsewhere): the same version, nothing written; new content: a new one.
    objects = sorted(p.name for p in (env.reg / "objects").rglob("*") if p.is_file())
    code, out, _ = cli(capsys, "add", str(env.run_a))
    assert code == 0 and f"triage:{vid} is already registered" in out and "nothing written" in out
    os.system(f"cp -r {env.run_a} {env.tmp / 'copy'}")
    code, out, _ = cli(capsys, "add", str(env.tmp / "copy"), "--name", "triage")
    assert added_id(out) == vid and "already registered" in out
    assert sorted(p.name for p in (env.reg / "objects").rglob("*") if p.is_file()) == objects
    (env.run_a / "eval.json").write_text(json.dumps(eval_result(env.test, sha256(env.run_a / "adapter" /
                                                                                 "adapter_model.safetensors"), n=199)))
    code, out, _ = cli(capsys, "add", str(env.run_a))
    assert out.startswith("added") and added_id(out) != vid and "1 file(s) stored now" in out  # only eval.json is new
    assert len(Registry().versions("triage")) == 2


def test_verify_names_a_modified_stored_file(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    assert cli(capsys, "verify")[0] == 0
    manifest = Registry().resolve(f"triage:{vid}").manifest
    stored = env.reg / object_path(manifest["files"]["adapter/adapter_model.safetensors"]["sha256"])
    os.chmod(stored, 0o644)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify")
    assert code == 1
    assert f"FAIL triage:{vid}: adapter/adapter_model.safetensors does not match its sha256" in out
    assert "1 problem(s)" in out
    # A gate reading a damaged evaluation refuses to trust it.
    ev = env.reg / object_path(manifest["files"]["eval.json"]["sha256"])
    os.chmod(ev, 0o644)
    ev.write_text(ev.read_text().replace("0.85", "0.99"))
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "production", "--gates", str(env.gates))
    assert code == 2 and "stored eval.json does not match its sha256" in err


def test_a_failing_gate_refuses_with_every_failed_gate_listed(env, capsys):
    weak = write_run(env.tmp / "runs" / "weak", env.test, seed=1, em=(0.70, 0.62, 0.78), forgetting=(1.5, 1.2, 1.8),
                     latency=(50.0, 100.0), suites={})
    vid = added_id(cli(capsys, "add", str(weak))[1])
    code, out, err = cli(capsys, "promote", f"weak:{vid}", "--to", "production", "--gates", str(env.gates))
    assert code == 1
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert re.search(r"exact_match \(95% lower bound\)\s+0.620 .*>= 0.750\s+FAIL", out)
    assert re.search(r"exact_match - prompt-only baseline \(95% lower bound\)\s+\+0.520 .*>= \+0.050\s+pass", out)
    assert re.search(r"forgetting \(95% upper bound\)\s+\+1.800 nats/token.*<= \+1.000 nats/token\s+FAIL", out)
    assert re.search(r"latency_overhead\s+\+100.0%.*<= \+25.0%\s+FAIL", out)
    assert re.search(r"peak_memory_gib\s+1.00 GiB.*<= 4.00 GiB\s+pass", out)
    assert re.search(r"suite safety\s+not run\s+pass\s+FAIL", out) and rows
    assert "refused: 4 of 7 gate(s) failed; weak:production stays at (none) (audit #1)" in err
    for line in ("exact_match (95% lower bound): 0.620", "forgetting (95% upper bound): +1.800",
                 "latency_overhead: +100.0%", "suite safety: not run, needs pass"):
        assert line in err
    assert "production" not in Registry().aliases().get("weak", {})
    entry = Registry().audit()[0]
    assert entry["action"] == "refused" and not entry["gates"]["passed"] and entry["to"].startswith(vid)


def test_promote_moves_the_alias_and_logs_then_rollback_and_force(env, capsys):
    a = added_id(cli(capsys, "add", str(env.run_a))[1])
    code, out, _ = cli(capsys, "promote", f"triage:{a}", "--to", "production", "--gates", str(env.gates))
    assert code == 0 and f"moved triage:production: (none) -> {a} (audit #1)" in out and "FAIL" not in out
    reg = Registry()
    assert reg.aliases()["triage"]["production"].startswith(a)
    entry = reg.audit()[0]
    assert entry["action"] == "promote" and entry["from"] is None and entry["who"].count("@") == 1
    assert entry["gates"]["sha256"] == sha256(env.gates) and len(entry["gates"]["results"]) == 7
    assert all(g["passed"] for g in entry["gates"]["results"]) and entry["forced"] is False
    # Promoting the same version again moves nothing and logs nothing.
    assert "already points to" in cli(capsys, "promote", "triage:production", "--to", "production",
                                      "--gates", str(env.gates))[1]
    assert len(reg.audit()) == 1

    # A second version that fails a gate: --force needs --reason, then moves it, logged as forced.
    b_dir = write_run(env.tmp / "runs" / "b", env.test, seed=2, em=(0.8, 0.7, 0.9))
    b = added_id(cli(capsys, "add", str(b_dir), "--name", "triage")[1])
    code, _, err = cli(capsys, "promote", f"triage:{b}", "--to", "production", "--gates", str(env.gates), "--force")
    assert code == 2 and "--force needs --reason" in err and len(reg.audit()) == 1
    code, out, _ = cli(capsys, "promote", f"triage:{b}", "--to", "production", "--gates", str(env.gates), "--force",
                       "--reason", "hotfix for ticket 42")
    assert code == 0 and f"moved triage:production: {a} -> {b} (audit #2), FORCED past 1 failed gate(s)" in out
    forced = reg.audit()[-1]
    assert forced["forced"] is True and forced["reason"] == "hotfix for ticket 42" and not forced["gates"]["passed"]

    code, out, _ = cli(capsys, "rollback", "production", "--reason", "bad answers")
    assert code == 0 and f"rolled back triage:production: {b} -> {a} (audit #3)" in out
    assert reg.aliases()["triage"]["production"].startswith(a)
    code, out, _ = cli(capsys, "rollback", "triage:production")
    assert "(removed: it had no earlier version)" in out and "production" not in reg.aliases().get("triage", {})
    code, _, err = cli(capsys, "rollback", "triage:production")
    assert code == 2 and "has no alias 'production'" in err

    code, out, _ = cli(capsys, "log")
    assert [line.split()[0] for line in out.splitlines()] == ["#1", "#2", "#3", "#4"]
    assert "FORCED reason: hotfix for ticket 42" in out and "rollback" in out
    assert cli(capsys, "verify")[0] == 0
    code, out, _ = cli(capsys, "diff", f"triage:{a}", f"triage:{b}")
    assert "optim.lr: 0.01 -> 0.03" in out and "run.seed: 0 -> 2" in out and "exact_match.value: 0.85 -> 0.8" in out
    assert "file changed: adapter/adapter_model.safetensors" in out


def test_get_writes_a_run_directory_back(env, capsys):
    cli(capsys, "add", str(env.run_a))
    code, out, _ = cli(capsys, "get", "triage", "--out", str(env.tmp / "out"))
    assert code == 0
    for rel in ("config.yaml", "results.json", "eval.json", "adapter/adapter_model.safetensors"):
        assert sha256(env.tmp / "out" / rel) == sha256(env.run_a / rel)
    assert cli(capsys, "get", "triage", "--out", str(env.tmp / "out"))[0] == 2  # never over a directory


def test_a_merged_model_needs_validation_and_a_suite_pass(env, capsys):
    from nemo_adapt.models.loader import base_fingerprint

    cli(capsys, "add", str(env.run_a))
    merged = write_merged(env.tmp / "merged", "failed_validation", parents=[env.run_a / "adapter"])
    fp = base_fingerprint(SimpleNamespace(spec=SimpleNamespace(name="tiny_llama"), location=merged))
    evaluation = env.tmp / "eval_merged.json"
    evaluation.write_text(json.dumps(eval_result(env.test, None, model={"architecture": "tiny_llama",
                                                                         "fingerprint": fp}, suites={})))
    code, out, _ = cli(capsys, "add", str(merged), "--eval", str(evaluation))
    assert code == 0 and "merged, merged:linear model" in out
    vid = added_id(out)
    lineage = cli(capsys, "lineage", f"merged:{vid}")[1]
    assert re.search(r"merge_parent .*= triage:[0-9a-f]{12}", lineage)
    assert f"child         merged:{vid}" in cli(capsys, "lineage", "triage")[1]
    code, out, err = cli(capsys, "promote", f"merged:{vid}", "--to", "production", "--gates", str(env.gates),
                         "--force", "--reason", "try")
    assert code == 1 and re.search(r"merged model: merge validation status\s+failed_validation\s+= validated\s+FAIL", out)
    assert re.search(r"merged model: regression suites\s+none run", out) and "does not override" in err
    # Validated and with a suite pass, it is judged by the gates file alone.
    merged_ok = write_merged(env.tmp / "merged_ok", "validated", parents=[env.run_a / "adapter"], seed=1)
    fp = base_fingerprint(SimpleNamespace(spec=SimpleNamespace(name="tiny_llama"), location=merged_ok))
    evaluation.write_text(json.dumps(eval_result(env.test, None, model={"architecture": "tiny_llama",
                                                                         "fingerprint": fp})))
    vid = added_id(cli(capsys, "add", str(merged_ok), "--eval", str(evaluation), "--name", "merged",
                       "--baseline", str(env.run_a / "eval_baseline.json"))[1])
    code, out, _ = cli(capsys, "promote", f"merged:{vid}", "--to", "production", "--gates", str(env.gates))
    assert code == 0 and "moved merged:production" in out
    # An evaluation of other weights is refused at add.
    code, _, err = cli(capsys, "add", str(merged), "--eval", str(evaluation), "--name", "other")
    assert code == 2 and "evaluated model tiny_llama@" in err and "evaluate this model" in err


def test_bad_input_is_one_clear_error(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    cli(capsys, "promote", f"triage:{vid}", "--to", "production", "--gates", str(env.gates))
    code, _, err = cli(capsys, "show", "triage:prodution")
    assert code == 2 and "'triage' has no version or alias 'prodution'; did you mean 'production'?" in err
    code, _, err = cli(capsys, "show", "traige")
    assert code == 2 and "no artifact named 'traige'" in err and "did you mean 'triage'?" in err
    code, _, err = cli(capsys, "promote", "triage:ffff", "--to", "staging", "--gates", str(env.gates))
    assert code == 2 and "no version or alias 'ffff'" in err
    code, _, err = cli(capsys, "rollback", "prodution")
    assert code == 2 and "no artifact has an alias 'prodution'; did you mean 'production'?" in err

    bad = write_gates(env.tmp, "gates:\n  - {metric: exact_match, min: 0.5}\n  - {metric: exact_mach, min: 0.7}\n",
                      "bad.yaml")
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "staging", "--gates", str(bad))
    assert code == 2 and f"{bad}:3: metric 'exact_mach' does not exist; did you mean 'exact_match'?" in err
    assert "valid metrics: exact_match, token_f1, field_accuracy, label_accuracy, forgetting" in err
    field = write_gates(env.tmp, "gates:\n  - {metric: field_accuracy.teem, min: 0.5}\n", "field.yaml")
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "staging", "--gates", str(field))
    assert code == 2 and f"{field}:2: metric 'field_accuracy.teem' does not exist in this evaluation" in err
    assert "fields team, priority" in err

    (env.tmp / "notes").mkdir()
    (env.tmp / "notes" / "readme.txt").write_text("hi")
    code, _, err = cli(capsys, "add", str(env.tmp / "notes"))
    assert code == 2 and "is not an artifact nemo-adapt registry can add" in err and "found: readme.txt" in err
    code, _, err = cli(capsys, "add", str(env.tmp / "missing"))
    assert code == 2 and "no such directory" in err
    unfinished = write_run(env.tmp / "runs" / "unfinished", env.test)
    (unfinished / "results.json").unlink()
    code, _, err = cli(capsys, "add", str(unfinished))
    assert code == 2 and "has not finished (no results.json)" in err
    other = write_run(env.tmp / "runs" / "other", env.test, seed=5)
    (other / "eval.json").write_text((env.run_a / "eval.json").read_text())  # another adapter's evaluation
    code, _, err = cli(capsys, "add", str(other))
    assert code == 2 and "evaluated adapter weights sha256" in err and "evaluate this adapter" in err
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "latest", "--gates", str(env.gates))
    assert code == 2 and "reserved" in err
    assert cli(capsys, "verify")[0] == 0  # none of it wrote anything half way


def test_a_study_output_adds_its_recommendation_with_the_studys_baseline(env, capsys):
    out = env.tmp / "study"
    write_run(out / "lora", env.test, seed=3, baseline=False)
    (out / "prompt_only").mkdir()
    (out / "prompt_only" / "eval_baseline.json").write_text((env.run_a / "eval_baseline.json").read_text())
    matrix = {"study": "triage", "study_sha256": "9" * 64, "dataset": {"version": "triage-v1"},
              "rows": [{"name": "prompt_only", "kind": "baseline"}, {"name": "lora", "kind": "peft"}],
              "scenarios": [{"scenario": {"name": "faq_bot"}, "recommendation": "lora", "why": "cheapest"},
                            {"scenario": {"name": "regulated"}, "recommendation": None, "why": "none passes"}]}
    (out / "matrix.json").write_text(json.dumps(matrix))
    code, _, err = cli(capsys, "add", str(out))
    assert code == 2 and "--scenario" in err and "faq_bot (recommends lora)" in err
    code, _, err = cli(capsys, "add", str(out), "--scenario", "regulated")
    assert code == 2 and "recommends no candidate" in err
    code, text, _ = cli(capsys, "add", str(out), "--scenario", "faq_bot")
    assert code == 0 and text.startswith("added lora:") and "note" not in text  # the study's baseline came along
    vid = added_id(text)
    assert "study         triage scenario faq_bot: recommended lora" in cli(capsys, "lineage", "lora")[1]
    code, text, _ = cli(capsys, "promote", f"lora:{vid}", "--to", "production", "--gates", str(env.gates))
    assert code == 0 and "exact_match - prompt-only baseline" in text and "moved lora:production" in text


def test_an_adapter_and_a_hugging_face_directory_are_versions_too(env, capsys):
    code, out, _ = cli(capsys, "add", str(env.run_a / "adapter"), "--eval", str(env.run_a / "eval.json"))
    assert code == 0 and out.startswith("added triage:") and "(adapter, lora adapter, 3 files" in out
    assert "note: no prompt-only baseline recorded" in out
    manifest = Registry().resolve("triage").manifest
    assert sorted(manifest["files"]) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "eval.json"]
    assert manifest["base_model"]["fingerprint"].startswith("tiny_llama@")

    hf = write_merged(env.tmp / "export", "validated")
    (hf / "merge_config.json").unlink()  # an export: config.json and safetensors only
    code, out, _ = cli(capsys, "add", str(hf))
    assert code == 0 and "added export:" in out and "(hf_model, hf model, 2 files" in out
    assert "note: no evaluation recorded: every metric gate will fail (nemo-adapt eval RUN --model DIR" in out
    (hf / "model-00000.safetensors").write_bytes(b"not safetensors")
    code, _, err = cli(capsys, "add", str(hf), "--name", "broken")
    assert code == 2 and "is not a readable safetensors file" in err


def test_a_symbolic_link_out_of_an_artifact_is_refused_and_nothing_is_stored(env, capsys):
    secret = env.tmp / "host_secret.txt"
    secret.write_text("token=do-not-store")
    (env.run_a / "metrics.jsonl").unlink(missing_ok=True)
    (env.run_a / "metrics.jsonl").symlink_to(secret)  # a run file pointing outside the run
    code, _, err = cli(capsys, "add", str(env.run_a))
    assert code == 2 and "metrics.jsonl' is a symbolic link to" in err and "host_secret.txt" in err
    (env.run_a / "metrics.jsonl").unlink()
    (env.run_a / "adapter" / "notes.txt").symlink_to(secret)  # and inside adapter/
    code, _, err = cli(capsys, "add", str(env.run_a))
    assert code == 2 and "notes.txt' is a symbolic link to" in err
    stored = [p for p in env.reg.rglob("*") if p.is_file()] if env.reg.exists() else []
    assert not any("do-not-store" in p.read_text(errors="replace") for p in stored)
    # A link within the artifact (as Hugging Face hub snapshots hold) is its own file: stored.
    (env.run_a / "adapter" / "notes.txt").unlink()
    inside = next(p for p in (env.run_a / "adapter").iterdir() if p.suffix == ".json")
    (env.run_a / "adapter" / "notes.txt").symlink_to(inside)
    code, out, _ = cli(capsys, "add", str(env.run_a))
    assert code == 0 and "added triage:" in out
