"""A fault inside training (not bad input) ends `nemo-adapt run` cleanly: on every rank the logger is closed with
the failure's exit code, the process groups are destroyed, the exit code is non-zero, and stderr ends with one
line naming the step, the error and the checkpoint that resumes the run (the traceback above it)."""

import json
from pathlib import Path

import pytest

from tests.conftest import torchrun, write_tiny_chat_data, write_tiny_recipe

pytestmark = [pytest.mark.megatron, pytest.mark.slow]
WORKER = Path(__file__).with_name("fault_worker.py")


def test_a_fault_in_a_training_step_closes_the_logger_and_the_process_groups(tmp_path):
    data = write_tiny_chat_data(tmp_path / "data", rows=32)
    recipe = write_tiny_recipe(tmp_path, data)
    proc = torchrun(2, WORKER, str(recipe), "run.max_steps=6", "checkpoint.save_interval=2",
                    "logging.wandb_mode=disabled", env={"NEMO_ADAPT_CACHE": str(tmp_path / "cache")}, check=False)
    assert proc.returncode != 0
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"code"')]
    assert len(reports) == 2, proc.stdout[-2000:] + proc.stderr[-2000:]  # both ranks got to report
    for r in reports:
        assert r["code"] == 1 and r["steps"] == 3
        assert r["process_group"] is False
        assert r["closed"] == [1]
    last = [line for line in proc.stderr.splitlines() if line.startswith("nemo-adapt run: error:")]
    assert last, proc.stderr[-2000:]
    assert last[0] == ("nemo-adapt run: error: training failed at step 2 of 6: RuntimeError: injected fault: a NaN "
                       "in the all-reduce; checkpoint step_00000002 resumes the run")
    assert "Traceback (most recent call last)" in proc.stderr  # for whoever debugs it
    assert not (tmp_path / "run" / "results.json").exists()  # a failed run is not a finished one
    assert (tmp_path / "run" / "checkpoints").is_dir()
