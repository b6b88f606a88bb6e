"""W&B and the registry: offline, `add` does not touch W&B at all; online, it logs the version's files as a W&B
artifact and records the link, with secrets scrubbed from everything it sends and stores; a W&B failure never
fails an add. The online path runs against a stand-in `wandb` module (what it is asked to do is checked) and,
to prove those calls are the real API's, against the real `wandb` in offline mode. Only a run with a real
WANDB_API_KEY proves the upload and the link (docs/registry.md says so)."""

from __future__ import annotations

import json
import socket
import sys
import types
import warnings
from pathlib import Path

import pytest
import yaml

from nemo_adapt.artifacts.registry import Registry, log_wandb_artifact, scan_artifact
from nemo_adapt.artifacts.registry_store import RegistryWarning
from nemo_adapt.cli import main
from tests.registry_helpers import write_run, write_test_file

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123"
API_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_ADAPT_REGISTRY", str(tmp_path / "reg"))
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    # A listening local socket stands in for the W&B server's address (the stand-in module does the rest).
    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    run = write_run(tmp_path / "runs" / "triage", write_test_file(tmp_path / "data"))
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    recipe["logging"]["hf_token"] = TOKEN  # a secret that must not travel
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    yield run
    server.close()


class _Untouchable(types.ModuleType):
    def __getattr__(self, name):
        raise AssertionError(f"offline add touched wandb.{name}")


class _FakeWandb(types.ModuleType):
    """Records what the registry asks of W&B; `fail` makes log_artifact raise."""

    def __init__(self, fail: bool = False):
        super().__init__("wandb")
        self.calls, self.fail = [], fail
        fake = self

        class Artifact:
            def __init__(self, name, type, description=None, metadata=None):
                self.name, self.type, self.metadata, self.files = name, type, metadata, []
                self.qualified_name, self.version = f"team/registry-test/{name}:v0", "v0"
                self.url = f"https://wandb.ai/team/registry-test/artifacts/{type}/{name}/v0"
                fake.calls.append(("Artifact", name, type))
                fake.artifact = self

            def add_file(self, path, name=None):
                self.files.append((name, Path(path).read_bytes()))

            def wait(self):
                fake.calls.append(("wait",))

        class Run:
            url = "https://wandb.ai/team/registry-test/runs/abc123"

            def log_artifact(self, artifact, aliases=None):
                if fake.fail:
                    raise ConnectionError("api.wandb.ai unreachable")
                fake.calls.append(("log_artifact", aliases))

            def finish(self):
                fake.calls.append(("finish",))

        self.Artifact = Artifact

        def init(**kwargs):
            fake.calls.append(("init", kwargs))
            return Run()

        self.init = init


def test_offline_add_does_not_touch_wandb(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", _Untouchable("wandb"))
    assert main(["registry", "add", str(run_dir)]) == 0
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key, but offline asked for: still untouched
    (run_dir / "run_summary.json").write_text("{}")  # new content: a new version, a second add that could log
    assert main(["registry", "add", str(run_dir)]) == 0
    assert all(v.manifest["wandb"] is None for v in Registry().versions("triage"))
    assert "W&B" not in capsys.readouterr().out


def test_online_add_logs_an_artifact_and_records_the_link_without_secrets(run_dir, monkeypatch, capsys):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)  # auto -> online, as for a run
    monkeypatch.setenv("WANDB_ENTITY", "team")
    assert main(["registry", "add", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "W&B artifact team/registry-test/triage:v0: https://wandb.ai/team/registry-test/artifacts/adapter" in out
    init = fake.calls[0][1]
    assert init["project"] == "registry-test" and init["entity"] == "team" and init["mode"] == "online"
    assert init["job_type"] == "registry-add"
    assert [c[0] for c in fake.calls] == ["init", "Artifact", "log_artifact", "wait", "finish"]
    version = Registry().resolve("triage")
    assert fake.calls[2][1] == [f"registry-{version.short}"]
    assert sorted(n for n, _ in fake.artifact.files) == sorted(version.manifest["files"])
    assert fake.artifact.metadata["id"] == version.id and "files" not in fake.artifact.metadata
    link = version.manifest["wandb"]
    assert link["url"].endswith("/v0") and link["run"].endswith("/abc123") and link["artifact"].endswith(":v0")
    sent = json.dumps([c for c in fake.calls if c[0] == "init"] + [fake.artifact.metadata], default=str)
    stored = json.dumps(version.manifest)
    for text in (sent, stored):
        assert TOKEN not in text and API_KEY not in text
    assert version.manifest["recipe"]["logging"]["hf_token"] == "<redacted>"


def test_a_wandb_failure_is_a_warning_not_a_failed_add(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fail=True))
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    with pytest.warns(RegistryWarning, match=r"W&B artifact not logged \(ConnectionError: api.wandb.ai unreachable\)"):
        assert main(["registry", "add", str(run_dir)]) == 0
    version = Registry().resolve("triage")
    assert version.manifest["wandb"] is None and Registry().verify().problems == []


def test_an_unreachable_wandb_server_is_one_refused_connect_not_a_wandb_init(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", _Untouchable("wandb"))  # wandb.init is never reached
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the connect is refused
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.warns(RegistryWarning, match=rf"W&B artifact not logged: 127.0.0.1:{port} is unreachable"):
        assert main(["registry", "add", str(run_dir)]) == 0
    assert Registry().resolve("triage").manifest["wandb"] is None


def test_the_calls_are_real_wandb_api(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    scanned = scan_artifact(run_dir)
    manifest = {"id": "f" * 64, "name": "triage", "artifact": scanned.artifact, "recipe": {}, "files": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistryWarning)  # what log_wandb_artifact warns with when a W&B call raises
        link = log_wandb_artifact(manifest, scanned, mode="offline")
    assert link is not None and link["mode"] == "offline" and link["project"] == "nemo-adapt"
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0

