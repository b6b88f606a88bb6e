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
