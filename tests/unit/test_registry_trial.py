"""`nemo-adapt registry` after a fresh user's trial: junk adapters refused before anything is stored, one-line
errors (never a traceback) for a bad registry location or damaged files, `who` from the process, gate suite
typos and alias suggestions."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from nemo_adapt.cli import main
from tests.registry_helpers import write_gates, write_run, write_test_file


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NEMO_ADAPT_REGISTRY", str(tmp_path / "reg"))
    test = write_test_file(tmp_path / "data")
    return SimpleNamespace(tmp=tmp_path, test=test, reg=tmp_path / "reg",
                           run_a=write_run(tmp_path / "runs" / "triage", test, seed=0), gates=write_gates(tmp_path))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["registry", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def added_id(out: str) -> str:
    return re.search(r":([0-9a-f]{12}) ", out).group(1)


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
