"""`nemo-adapt registry` after a fresh user's trial: junk adapters refused before anything is stored, one-line
errors (never a traceback) for a bad registry location or damaged files, `who` from the process, gate suite
typos and alias suggestions."""

from __future__ import annotations

# ruff: noqa: F811 — tests take the `env` fixture imported from tests.registry_helpers
import errno
import re

from tests.registry_helpers import (
    added_id,
    cli,
    env,  # noqa: F401 — the shared pytest fixture
    write_gates,
    write_run,
)


def test_a_junk_adapter_is_refused_before_anything_is_stored(env, capsys):
    fake = env.tmp / "fakeadapter"
    fake.mkdir()
    (fake / "adapter_config.json").write_text('{"peft_type":"LORA","r":8}')
    (fake / "adapter_model.safetensors").write_text("garbage\n")
    code, _, err = cli(capsys, "add", str(fake))
    assert code == 2 and "adapter_model.safetensors" in err and "not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1 and not env.reg.exists()
    (env.run_a / "adapter" / "adapter_model.safetensors").write_text("garbage\n")  # inside a run too
    code, _, err = cli(capsys, "add", str(env.run_a))
    assert code == 2 and "not a readable safetensors file" in err and not env.reg.exists()


def test_a_registry_that_is_a_file_or_read_only_is_one_line(env, capsys, monkeypatch):
    afile = env.tmp / "afile"
    afile.write_text("x")
    for verb in (["list"], ["add", str(env.run_a)], ["verify"]):
        code, _, err = cli(capsys, *verb, "--registry", str(afile))
        assert code == 2 and "is a file, not a directory" in err and len(err.strip().splitlines()) == 1

    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(env.reg / "tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, _, err = cli(capsys, "add", str(env.run_a))
    assert code == 2 and f"registry {env.reg} is not writable (Read-only file system" in err


def test_damaged_audit_entries_and_manifests(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    for _ in range(3):
        cli(capsys, "promote", f"triage:{vid}", "--to", "staging", "--gates", str(env.gates))
    cli(capsys, "rollback", "triage:staging")
    cli(capsys, "promote", f"triage:{vid}", "--to", "production", "--gates", str(env.gates))
    audit = sorted((env.reg / "audit").iterdir())
    assert len(audit) >= 3
    audit[1].write_text("nope\n")
    for verb in ("log", "list"):
        code, _, err = cli(capsys, verb)
        assert code == 2 and f"audit/{audit[1].name}: unreadable JSON" in err and len(err.strip().splitlines()) == 1
    other = write_run(env.tmp / "runs" / "other", env.test, seed=3)
    cli(capsys, "add", str(other))
    manifest = next(p for p in (env.reg / "versions" / "other").iterdir())
    manifest.write_text("{broken")
    code, out, _ = cli(capsys, "verify")
    assert code == 1 and f"FAIL audit entry {audit[1].name}: unreadable JSON" in out
    assert f"FAIL {env.reg}/versions/other/{manifest.name}: unreadable manifest" in out
    assert "verified 1 version(s)" in out  # the intact one was still checked


def test_an_unparseable_run_config_is_one_line_with_its_line(env, capsys):
    (env.run_a / "config.yaml").write_text("model:\n  name: tiny\n peft: [\n")
    code, _, err = cli(capsys, "add", str(env.run_a))
    assert code == 2 and re.search(r"config\.yaml:\d+: not valid YAML", err) and len(err.strip().splitlines()) == 1


def test_missing_s3_credentials_and_a_closed_pipe(env, capsys, monkeypatch):
    from nemo_adapt.artifacts import registry

    class NoCredentialsError(Exception):  # botocore's, by name (botocore may not be installed)
        pass

    def names(self):
        raise NoCredentialsError("Unable to locate credentials")

    env.reg.mkdir()
    monkeypatch.setattr(registry.Registry, "names", names)
    code, _, err = cli(capsys, "list")
    assert code == 2 and "no credentials for the object store" in err and "AWS_ACCESS_KEY_ID" in err

    def pipe(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(registry.Registry, "names", pipe)
    code, out, err = cli(capsys, "list")
    assert code == 0 and err == ""


def test_a_location_that_is_not_a_registry_is_not_an_empty_one(env, capsys):
    for verb in (["verify"], ["list"], ["log"], ["show", "triage"]):
        code, out, err = cli(capsys, *verb, "--registry", str(env.tmp / "typo"))
        assert code == 2 and f"no registry at {env.tmp / 'typo'}: it does not exist" in err and "OK" not in out
    code, _, err = cli(capsys, "verify", "--registry", str(env.tmp / "runs"))  # a directory of other things
    assert code == 2 and f"no registry at {env.tmp / 'runs'}: it holds triage" in err
    (env.tmp / "fresh").mkdir()
    code, out, _ = cli(capsys, "list", "--registry", str(env.tmp / "fresh"))
    assert code == 0 and "is empty" in out
    assert cli(capsys, "add", str(env.run_a))[0] == 0  # add makes a registry where there was none
    assert cli(capsys, "verify")[0] == 0


def test_who_is_the_process_user_not_the_environment(monkeypatch):
    import os
    import pwd
    import socket

    from nemo_adapt.artifacts.registry import who

    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    assert who() == f"{pwd.getpwuid(os.geteuid()).pw_name}@{socket.gethostname()}"

    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert who() == f"uid{os.geteuid()}@{socket.gethostname()}"


def test_a_suite_name_typo_in_a_gates_file_is_an_input_error(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])  # its evaluation ran the suite "safety"
    typo = write_gates(env.tmp, "gates:\n  - {metric: exact_match, min: 0.5}\n  - {suites: [safty]}\n", "typo.yaml")
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "staging", "--gates", str(typo))
    assert code == 2 and f"{typo}:3: suite 'safty' is not in this evaluation; did you mean 'safety'?" in err
    assert "suites recorded: safety" in err
    other = write_gates(env.tmp, "gates:\n  - {suites: [general_knowledge]}\n", "other.yaml")
    code, _, err = cli(capsys, "promote", f"triage:{vid}", "--to", "staging", "--gates", str(other))
    assert code == 1 and "suite general_knowledge: not run, needs pass" in err  # a suite not run fails its gate


def test_suggestions_name_only_aliases_that_point_somewhere(env, capsys):
    vid = added_id(cli(capsys, "add", str(env.run_a))[1])
    strict = write_gates(env.tmp, "gates:\n  - {metric: exact_match, min: 0.99}\n", "strict.yaml")
    assert cli(capsys, "promote", f"triage:{vid}", "--to", "production", "--gates", str(strict))[0] == 1  # refused
    code, _, err = cli(capsys, "show", "triage:prodution")
    assert code == 2 and "did you mean 'production'" not in err and "aliases: none" in err
    cli(capsys, "promote", f"triage:{vid}", "--to", "production", "--gates", str(env.gates))
    code, _, err = cli(capsys, "show", "triage:prodution")
    assert code == 2 and "did you mean 'production'?" in err
    cli(capsys, "rollback", "triage:production")
    code, _, err = cli(capsys, "show", "triage:prodution")
    assert code == 2 and "did you mean 'production'" not in err
