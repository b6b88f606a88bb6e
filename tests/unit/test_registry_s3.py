"""The registry on an object store: s3fs (through fsspec) against a real S3-compatible server on localhost.

The server is moto's (`moto.server.ThreadedMotoServer`, port 0): it speaks the S3 REST API over HTTP, so the
bytes go through s3fs, aiobotocore and botocore exactly as against AWS — including the conditional write
(`If-None-Match: *`) the registry's create-if-absent relies on. The verbs run through the CLI (diff reads manifests only: tested on a directory); two threads
promoting at once leave an audit chain without a lost update; a damaged object is named by verify; no
credential reaches a stored manifest or audit entry.
"""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
from moto.server import ThreadedMotoServer

from nemo_adapt.artifacts.registry import Registry, object_path
from nemo_adapt.artifacts.registry_store import RegistryWarning
from nemo_adapt.cli import main
from tests.registry_helpers import sha256, write_gates, write_run, write_test_file

SECRET = "fake-secret-access-key-for-moto"


@pytest.fixture
def s3_url(monkeypatch):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing-access-key", "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)  # botocore reads the endpoint from AWS_ENDPOINT_URL: nothing registry-specific
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a client made before would keep its endpoint (this server's is new)
    s3fs.S3FileSystem().mkdir("models")
    try:
        yield "s3://models/registry"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["registry", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_verb_on_s3(s3_url, tmp_path, capsys):
    test = write_test_file(tmp_path / "data")
    runs = [write_run(tmp_path / "runs" / "triage", test, seed=0),
            write_run(tmp_path / "runs" / "triage_b", test, seed=1)]
    gates = write_gates(tmp_path)
    failing = write_gates(tmp_path, "gates:\n  - {metric: exact_match, min: 0.95}\n", "fail.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistryWarning)  # S3 (moto) honours conditional writes: no warning
        code, out, _ = cli(capsys, "add", str(runs[0]), "--registry", s3_url)
        assert code == 0 and f"to registry {s3_url}" in out
        a = out.split("triage:")[1][:12]
        code, out, _ = cli(capsys, "add", str(runs[0]), "--registry", s3_url)
        assert "is already registered" in out
        b = cli(capsys, "add", str(runs[1]), "--registry", s3_url, "--name", "triage")[1].split("triage:")[1][:12]

        assert a in cli(capsys, "list", "--registry", s3_url)[1]
        assert "suite safety: pass" in cli(capsys, "show", f"triage:{a}", "--registry", s3_url)[1]
        code, out, err = cli(capsys, "promote", f"triage:{a}", "--to", "staging", "--gates", str(failing),
                             "--registry", s3_url)
        assert code == 1 and "exact_match (95% lower bound): 0.800  (0.850 [0.800, 0.900], n=200), needs >= 0.950" in err
        code, out, _ = cli(capsys, "promote", f"triage:{a}", "--to", "production", "--gates", str(gates),
                           "--registry", s3_url)
        assert code == 0 and f"moved triage:production: (none) -> {a} (audit #2)" in out
        assert cli(capsys, "promote", f"triage:{b}", "--to", "production", "--gates", str(gates),
                   "--registry", s3_url)[0] == 0
        code, out, _ = cli(capsys, "rollback", "triage:production", "--registry", s3_url)
        assert f"{b} -> {a} (audit #4)" in out
        assert cli(capsys, "get", "triage:production", "--out", str(tmp_path / "got"), "--registry", s3_url)[0] == 0
        assert sha256(tmp_path / "got" / "adapter" / "adapter_model.safetensors") == \
            sha256(runs[0] / "adapter" / "adapter_model.safetensors")

        # Two writers at once, 2 rounds: conditional creates keep the audit log a chain.
        def promote(ref: str, errors: list) -> None:
            try:
                Registry(s3_url).promote(ref, "canary", gates)
            except Exception as err:  # reported below
                errors.append(err)

        for _ in range(2):
            errors: list = []
            threads = [threading.Thread(target=promote, args=(f"triage:{v}", errors)) for v in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors
        code, out, _ = cli(capsys, "verify", "--registry", s3_url)
        assert code == 0 and "verified 2 version(s)" in out

    reg = Registry(s3_url)
    canary = [e for e in reg.audit() if e["alias"] == "canary"]
    assert 3 <= len(canary) <= 4  # re-promoting the version already there logs nothing
    assert [e["seq"] for e in reg.audit()] == list(range(1, len(reg.audit()) + 1))
    fs = reg.store.fs
    for path in fs.find("models/registry/versions") + fs.find("models/registry/audit"):
        assert SECRET not in fs.cat_file(path).decode() and "testing-access-key" not in fs.cat_file(path).decode()

    # A damaged object is named.
    manifest = reg.resolve(f"triage:{a}").manifest
    target = f"models/registry/{object_path(manifest['files']['config.yaml']['sha256'])}"
    fs.pipe_file(target, b"run: {name: edited}\n")
    code, out, _ = cli(capsys, "verify", "--registry", s3_url)
    assert code == 1 and f"FAIL triage:{a}: config.yaml does not match its sha256" in out
