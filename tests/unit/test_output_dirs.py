"""Outputs replace their destination whole, so a destination holding anything but an earlier output of
ours is refused before any work, and its files are left as they were."""

import pytest

from nemo_adapt.cli import main
from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.hf import check_replaceable

pytestmark = pytest.mark.megatron


def test_export_refuses_a_directory_of_other_files_and_replaces_an_earlier_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("important\n")
    assert main(["export", str(victim), "--checkpoint", "random:tiny_llama"]) == 2
    err = capsys.readouterr().err
    assert f"output directory {str(victim)!r} is not empty and is not an earlier export" in err
    assert (victim / "notes.txt").read_text() == "important\n" and sorted(p.name for p in victim.iterdir()) == \
        ["notes.txt"]
    out = tmp_path / "out"
    assert main(["export", str(out), "--checkpoint", "random:tiny_llama"]) == 0
    assert main(["export", str(out), "--checkpoint", "random:tiny_llama"]) == 0  # an earlier export: replaced
    assert (out / "config.json").is_file()


def test_check_replaceable_cases(tmp_path):
    check_replaceable(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        check_replaceable(tmp_path / "file")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    check_replaceable(tmp_path / "adapter")


def test_sigterm_during_an_export_leaves_no_partial_directory(tmp_path):
    """SIGTERM (a Slurm time limit, `timeout`, `kill`) while an export is being written: the command unwinds through
    its cleanup — no destination, no temporary sibling — and exits 128 + 15."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "smollm2"
    tmp = tmp_path / ".smollm2.tmp"
    env = {**os.environ, "NEMO_ADAPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "nemo_adapt.cli", "export", str(out), "--checkpoint",
                             "embedded:smollm2_135m"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tmp.exists(), "the export never started writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM; nothing partial was left behind" in err
    assert not tmp.exists() and not out.exists()
