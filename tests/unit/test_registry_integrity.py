"""What `registry verify` and `promote` catch beyond re-hashing files: an edited manifest (sealed), a manifest copied
under another name, an evaluation that contradicts itself, an edited, replaced or deleted audit entry (chained, with
a head); and what round-trips: every version `registry get` writes is added back as the same version."""

from __future__ import annotations

# ruff: noqa: F811 — tests take the `env` fixture imported from tests.registry_helpers
import hashlib
import json
import os
import shutil

import pytest

from nemo_adapt.artifacts.gates import evaluation_problems
from nemo_adapt.artifacts.registry import AUDIT_HEAD, Registry, object_path
from tests.registry_helpers import (
    added_id,
    cli,
    env,  # noqa: F401 — the shared pytest fixture
    eval_result,
    sha256,
    write_merged,
    write_run,
)


def _writable(path):
    os.chmod(path, 0o644)
    return path


def _manifest_path(env, name: str, vid_prefix: str):
    v = Registry().resolve(f"{name}:{vid_prefix}")
    return env.reg / "versions" / name / f"{v.id}.json", v


def test_an_edited_manifest_field_fails_verify_and_a_copied_manifest_is_named(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    assert cli(capsys, "verify")[0] == 0
    path, v = _manifest_path(env, "triage", vid)
    assert v.manifest["manifest_sha256"]
    original = path.read_text()

    # Lineage edited: the id (files) still matches, the seal does not.
    m = json.loads(original)
    m["base_model"]["fingerprint"] = "other_model@ffffffffffffffff"
    _writable(path).write_text(json.dumps(m))
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and f"FAIL triage:{vid}" in out and "manifest edited after it was written" in out

    # The evaluation summary forged and the seal recomputed: derived again from the stored eval.json, it differs.
    from nemo_adapt.artifacts.registry import manifest_seal

    m = json.loads(original)
    m["evaluation"]["metrics"]["exact_match"]["low"] = 0.99
    m["manifest_sha256"] = manifest_seal(m)
    path.write_text(json.dumps(m))
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and "evaluation summary differs from its stored eval.json" in out
    assert "manifest edited" not in out
    path.write_text(original)
    assert cli(capsys, "verify")[0] == 0

    # The whole manifest copied under another name: the id matches its files, the name does not.
    (env.reg / "versions" / "other").mkdir()
    shutil.copy(path, env.reg / "versions" / "other" / path.name)
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and f"FAIL other:{vid}" in out and "names 'triage': copied or moved from another name" in out


def test_a_self_contradicting_evaluation_is_refused_at_add_and_by_the_gates(env, capsys):
    run = write_run(env.tmp / "runs" / "forged", env.test, seed=3)
    result = json.loads((run / "eval.json").read_text())
    result["correct"], result["n"] = 190, 200  # 0.95, but the recorded exact match is 0.85
    (run / "eval.json").write_text(json.dumps(result))
    code, _, err = cli(capsys, "add", str(run))
    assert code == 2 and "eval.json' contradicts itself" in err
    assert "correct / n = 190/200 = 0.9500 but exact_match = 0.85" in err
    assert not (env.reg / "versions" / "forged").exists()

    # Each kind of contradiction is named.
    good = eval_result(env.test, "a" * 64)
    assert evaluation_problems(good) == []
    bad = json.loads(json.dumps(good))
    bad["metrics"]["exact_match"].update(value=1.3, n=50)
    bad["metrics"]["token_f1"].update(low=0.97, high=0.9)
    bad["suites"]["safety"].update(passed=6, checked=5)
    bad["n"] = -1
    found = "\n".join(evaluation_problems(bad))
    for what in ("n = -1 is not a count", "metrics.exact_match = ", "outside [0, 1]", "metrics.token_f1 has low 0.97",
                 "exact_match = 0.85 but metrics.exact_match.value = 1.3", "suite safety: passed = 6 of checked = 5"):
        assert what in found, what

    # One stored by an older version (written straight into the store) fails promote, and --force cannot pass it.
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    v = Registry().resolve(f"triage:{vid}")
    stored = env.reg / object_path(v.manifest["files"]["eval.json"]["sha256"])
    forged = json.loads(stored.read_text())
    forged["suites"]["safety"].update(passed=3, checked=5)  # pass: true left standing
    data = json.dumps(forged).encode()
    sha = hashlib.sha256(data).hexdigest()
    (env.reg / object_path(sha)).parent.mkdir(parents=True, exist_ok=True)
    (env.reg / object_path(sha)).write_bytes(data)
    v.manifest["files"]["eval.json"] = {"sha256": sha, "size": len(data)}
    from nemo_adapt.artifacts.registry import version_id

    new_id = version_id(v.manifest["kind"], v.manifest["files"])
    v.manifest.update(id=new_id)
    v.manifest.pop("manifest_sha256")
    (env.reg / "versions" / "triage" / f"{new_id}.json").write_text(json.dumps(v.manifest))
    code, _, err = cli(capsys, "promote", f"triage:{new_id[:12]}", "--to", "production", "--gates", str(env.gates),
                       "--force", "--reason", "trust me")
    assert code == 1 and "evaluation is self-consistent: suite safety: pass = True but 3 of 5 cases passed" in err
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and "stored eval.json: suite safety: pass = True but 3 of 5" in out
    assert f"triage:{new_id[:12]}: manifest without a seal" in out  # a note, not a problem


def _promote_twice(env, capsys) -> str:
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    for alias in ("staging", "production"):
        assert cli(capsys, "promote", f"triage:{vid}", "--to", alias, "--gates", str(env.gates))[0] == 0
    return vid


@pytest.mark.parametrize("damage", ["edit_first", "edit_newest", "delete_newest", "replace_first", "delete_head"])
def test_the_audit_log_is_chained_and_its_head_recorded(env, capsys, damage):
    _promote_twice(env, capsys)
    audit = env.reg / "audit"
    first, newest = audit / "00000001.json", audit / "00000002.json"
    e2 = json.loads(newest.read_text())
    assert e2["prev"] == sha256(first) and json.loads(first.read_text())["prev"] is None
    assert json.loads((env.reg / AUDIT_HEAD).read_text()) == {"seq": 2, "sha256": sha256(newest)}
    assert cli(capsys, "verify")[0] == 0

    if damage == "edit_first":
        e = json.loads(first.read_text())
        e["who"] = "someone-else"
        _writable(first).write_text(json.dumps(e, indent=2) + "\n")
        want = "audit entry 1 was edited or replaced after entry 2 was written"
    elif damage == "edit_newest":
        e2["reason"] = "approved by the board"
        _writable(newest).write_text(json.dumps(e2, indent=2) + "\n")
        want = "audit entry 2 was edited after it was written"
    elif damage == "delete_newest":
        newest.unlink()  # production silently back to unset: the head still says entry 2 was written
        want = "the audit log ends at entry 1 but audit_head.json says entry 2 was written: entry 2 deleted"
    elif damage == "replace_first":
        e = json.loads(first.read_text())
        e["gates"]["passed"] = True
        e["reason"] = "rewritten"
        _writable(first).write_text(json.dumps(e))
        want = "audit entry 1 was edited or replaced"
    else:
        (env.reg / AUDIT_HEAD).unlink()
        want = "audit_head.json is missing although the audit log is chained"
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and want in out, out


def test_a_forced_attempt_on_a_merged_model_is_logged_as_forced_and_refused(env, capsys):
    merged = write_merged(env.tmp / "merged", "unvalidated", parents=[env.run_a / "adapter"])
    vid = added_id(cli(capsys, "add", str(merged))[1])
    code, _, err = cli(capsys, "promote", f"merged:{vid}", "--to", "production", "--gates", str(env.gates),
                       "--force", "--reason", "hotfix")
    assert code == 1 and "--force does not override" in err
    entry = Registry().audit()[-1]
    assert entry["action"] == "refused" and entry["force_requested"] is True and entry["reason"] == "hotfix"
    code, out, _ = cli(capsys, "log")
    assert "refused  merged:production" in out and "(forced attempt) reason: hotfix" in out


def test_merged_adapters_record_their_base_model(env, capsys):
    merged = write_merged(env.tmp / "merged", "validated", parents=[env.run_a / "adapter"])
    cfg = json.loads((merged / "merge_config.json").read_text())
    cfg["base_model"] = None  # adapters merged into their base: each parent names it, as `nemo-adapt merge` writes
    for m in cfg["models"]:
        m.update(base_model="random:tiny_llama", base_model_fingerprint="tiny_llama@0123456789abcdef")
    (merged / "merge_config.json").write_text(json.dumps(cfg))
    vid = added_id(cli(capsys, "add", str(merged))[1])
    assert Registry().resolve(f"merged:{vid}").manifest["base_model"]["fingerprint"] == "tiny_llama@0123456789abcdef"
    code, out, _ = cli(capsys, "lineage", f"merged:{vid}")
    assert code == 0 and "base model    tiny_llama@0123456789abcdef (random:tiny_llama)" in out


def test_every_kind_of_version_round_trips_through_get_and_add(env, capsys):
    hf = write_merged(env.tmp / "export", "validated")
    (hf / "merge_config.json").unlink()
    sources = {
        "run": [str(env.run_a)],
        "adapter": [str(env.run_a / "adapter"), "--eval", str(env.run_a / "eval.json")],
        "merged": [str(write_merged(env.tmp / "merged", "validated", parents=[env.run_a / "adapter"]))],
        "hf_model": [str(hf)],
    }
    for kind, args in sources.items():
        code, out, _ = cli(capsys, "add", *args, "--name", kind)
        assert code == 0, out
        vid = added_id(out)
        got = env.tmp / "got" / kind
        assert cli(capsys, "get", f"{kind}:{vid}", "--out", str(got))[0] == 0
        code, out, err = cli(capsys, "add", str(got), "--name", kind)
        assert code == 0, err
        assert added_id(out) == vid and "already registered" in out, (kind, out)
        assert Registry().resolve(f"{kind}:{vid}").manifest["kind"] == kind


def test_writers_refuse_a_damaged_audit_log_so_damage_cannot_be_buried(env, capsys):
    vid = _promote_twice(env, capsys)
    (env.reg / "audit" / "00000002.json").unlink()  # the production promotion erased...
    (env.reg / AUDIT_HEAD).unlink()  # ...with its trace in the head
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "canary", "--gates", str(env.gates))
    assert code == 2 and "the audit log is damaged" in err and "nothing was written" in err
    assert sorted(p.name for p in (env.reg / "audit").iterdir()) == ["00000001.json"]  # nothing appended over it
    assert cli(capsys, "rollback", "triage:staging")[0] == 2
    assert cli(capsys, "verify")[0] == 1


def test_a_damaged_version_is_not_promoted_and_get_says_so_in_one_line(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    v = Registry().resolve(f"triage:{vid}")
    (env.reg / object_path(v.manifest["files"]["adapter/adapter_model.safetensors"]["sha256"])).unlink()
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "staging", "--gates", str(env.gates))
    assert code == 2 and "is damaged (adapter/adapter_model.safetensors is missing from the store)" in err
    assert not (env.reg / "audit").exists() or not list((env.reg / "audit").iterdir())
    code, _, err = cli(capsys, "get", f"triage:{vid}", "--out", str(env.tmp / "got"))
    assert code == 2 and "adapter/adapter_model.safetensors is missing from the store" in err
    assert "Traceback" not in err and not (env.tmp / "got").exists()


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r["metrics"]["exact_match"].update(low=0.88, high=0.95), "lies outside its own interval [0.88, 0.95]"),
    (lambda r: r["suites"]["safety"].update(cases=3), "suite safety: checked = 5 of its 3 cases"),
    (lambda r: r["suites"]["safety"].update({"pass": "false"}), "suite safety: pass = 'false' is not true or false"),
    (lambda r: r["inference_cost"]["as_evaluated"].update(peak_memory_bytes=-5), "peak_memory_bytes = -5 is not a size"),
    (lambda r: r["metrics"]["ci"].update(level=0.5), "metrics.ci.level = 0.5, but gates judge 95% intervals"),
    (lambda r: r["metrics"].update(confusion={"priority": {"P1": {"P1": 500}}}), "metrics.confusion.priority counts 500"),
])
def test_more_contradictions_in_an_evaluation_are_refused(env, capsys, edit, expected):
    result = json.loads((env.run_a / "eval.json").read_text())
    edit(result)
    (env.run_a / "eval.json").write_text(json.dumps(result))
    code, _, err = cli(capsys, "add", str(env.run_a))
    assert code == 2 and expected in err, err


def test_a_baseline_of_another_model_or_test_split_is_refused(env, capsys):
    base = json.loads((env.run_a / "eval_baseline.json").read_text())
    other = json.loads(json.dumps(base))
    other["baseline"]["provenance"]["model"] = {"fingerprint": "llama3_8b@1111111111111111"}
    (env.tmp / "other_model.json").write_text(json.dumps(other))
    code, _, err = cli(capsys, "add", str(env.run_a), "--baseline", str(env.tmp / "other_model.json"))
    assert code == 2 and "evaluated model llama3_8b@1111111111111111, but this version's base model is tiny_llama@" in err
    other = json.loads(json.dumps(base))
    other["baseline"]["provenance"]["test_sha256"] = "f" * 64
    (env.tmp / "other_split.json").write_text(json.dumps(other))
    code, _, err = cli(capsys, "add", str(env.run_a), "--baseline", str(env.tmp / "other_split.json"))
    assert code == 2 and "scored on test sha256 ffffffffffff" in err
    other = json.loads(json.dumps(base))
    other["baseline"]["correct"] = 14  # of 200, but exact match 0.1
    (env.tmp / "contradicts.json").write_text(json.dumps(other))
    code, _, err = cli(capsys, "add", str(env.run_a), "--baseline", str(env.tmp / "contradicts.json"))
    assert code == 2 and "baseline: correct / n = 14/200" in err
    code, out, _ = cli(capsys, "add", str(env.run_a), "--baseline", "none")
    assert code == 0 and "eval_baseline.json" not in Registry().resolve("triage").manifest["files"]


def test_a_bare_validated_status_does_not_satisfy_the_merged_model_rule(env, capsys):
    merged = write_merged(env.tmp / "merged", "validated", parents=[env.run_a / "adapter"])
    cfg = json.loads((merged / "merge_config.json").read_text())
    (merged / "merge_config.json").write_text(json.dumps({"status": "validated"}))  # written by hand
    vid = added_id(cli(capsys, "add", str(merged), "--eval", str(_merged_eval(env, merged)))[1])
    code, _, err = cli(capsys, "promote", f"merged:{vid}", "--to", "production", "--gates", str(env.gates))
    assert code == 1 and "validated, but no passing validation outcomes" in err
    assert cfg["validation"][0]["passed"] is True  # what `merge --validate` would have recorded


def _merged_eval(env, merged) -> os.PathLike:
    """An evaluation of the merged model's weights (its fingerprint recomputed as `registry add` does)."""
    from types import SimpleNamespace

    from nemo_adapt.models.loader import base_fingerprint

    fp = base_fingerprint(SimpleNamespace(spec=SimpleNamespace(name="tiny_llama"), location=str(merged)))
    path = env.tmp / "merged_eval.json"
    path.write_text(json.dumps(eval_result(env.test, None, model={"architecture": "tiny_llama", "fingerprint": fp})))
    return path


def test_odd_locations_names_and_refs_get_one_clear_line(env, capsys):
    other = env.tmp / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("not a registry")
    code, _, err = cli(capsys, "add", str(env.run_a), "--registry", str(other))
    assert code == 2 and "no registry at" in err and "it holds readme.txt" in err
    assert sorted(p.name for p in other.iterdir()) == ["readme.txt"]
    code, _, err = cli(capsys, "add", str(env.run_a), "--registry", str(other / "readme.txt" / "reg"))
    assert code == 2 and "readme.txt is a file, so no registry can live under it" in err
    code, _, err = cli(capsys, "add", str(env.run_a), "--name", " ")
    assert code == 2 and "--name is empty" in err

    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    assert cli(capsys, "show", f"triage:{vid.upper()[:8]}")[0] == 0  # an id copied in upper case
    assert cli(capsys, "promote", f"triage:{vid}", "--to", "c1", "--gates", str(env.gates))[0] == 0  # 2 hex digits
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "beef", "--gates", str(env.gates))
    assert code == 2 and "not 4 or more hex digits alone" in err
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "a" * 300, "--gates", str(env.gates))
    assert code == 2 and "is 300 characters long; at most 64" in err


def test_verify_derives_the_base_model_again_from_the_stored_files(env, capsys):
    from nemo_adapt.artifacts.registry import manifest_seal

    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    path, _ = _manifest_path(env, "triage", vid)
    m = json.loads(path.read_text())
    m["base_model"]["fingerprint"] = "llama3_8b@2222222222222222"
    m["manifest_sha256"] = manifest_seal(m)  # re-sealed: the seal alone cannot tell
    _writable(path).write_text(json.dumps(m))
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and "the manifest's base model llama3_8b@2222222222222222 is not the tiny_llama@" in out
