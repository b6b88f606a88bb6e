"""The command line: errors are one line with exit code 2; generation answers the capital question."""

import subprocess
import sys

import pytest

from nemo_adapt.cli import main


def test_bad_checkpoint_is_a_clean_error(capsys, tmp_path):
    code = main(["generate", "hi", "--checkpoint", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err and "Traceback" not in err


def test_bad_layout_is_refused_before_loading(capsys):
    code = main(["generate", "hi", "--tensor-parallel", "2"])
    assert code == 2
    assert "parallel.tensor=2 does not divide num_attention_heads=9" in capsys.readouterr().err


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2_135m" in out and "llama3_70b" in out


@pytest.mark.slow
def test_generate_answers_paris():
    proc = subprocess.run([sys.executable, "-m", "nemo_adapt.cli", "generate", "What is the capital of France?",
                           "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
