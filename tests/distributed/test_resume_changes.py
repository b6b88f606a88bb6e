"""`nemo-adapt run` resumes the run it was: a changed batch or step budget is refused before any work,
unless named in checkpoint.resume_changes; then the data continues at the consumed sample and the
recipe's schedule applies from the next step, reported beside the checkpoint's."""

import json

import pytest

from tests.conftest import read_metrics
from tests.conftest import run_tiny as _run

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def test_changed_batch_and_step_budget_refused_then_accepted_explicitly(tmp_path, tiny_data, cache_env):
    from nemo_adapt.config import load_recipe
    from nemo_adapt.training.engine import lr_at

    first = {"run": {"max_steps": 4}, "optim": {"lr": 0.005, "schedule": "cosine"}}
    run_dir, _ = _run(tmp_path, "r", tiny_data, cache_env, **first)
    root = run_dir / "checkpoints"
    state = json.loads((root / "step_00000004" / "state.json").read_text())
    assert state["consumed_samples"] == 32 and state["schedule"]["total_steps"] == 4
    assert state["settings"]["train.global_batch_size"] == 8

    # A longer cosine run re-shapes the schedule of the remaining steps: refused, naming the LR change.
    _, proc = _run(tmp_path, "r", tiny_data, cache_env, check=False, **{**first, "run": {"max_steps": 6}})
    assert proc.returncode != 0
    assert "run.max_steps: 4 -> 6 changes the learning-rate schedule" in proc.stderr
    assert "checkpoint.resume_changes=[run.max_steps]" in proc.stderr
    # Another global batch size as well: both refused in one message, before any work.
    changed = {**first, "run": {"max_steps": 6}, "train": {"global_batch_size": 16}}
    _, proc = _run(tmp_path, "r", tiny_data, cache_env, check=False, **changed)
    assert proc.returncode != 0
    assert "train.global_batch_size: 8 -> 16" in proc.stderr and "run.max_steps: 4 -> 6" in proc.stderr
    assert "checkpoint.resume_changes=[train.global_batch_size,run.max_steps]" in proc.stderr
    assert "preparing data" not in proc.stdout
    assert (root / "latest").read_text().strip() == "step_00000004"

    _, proc = _run(tmp_path, "r", tiny_data, cache_env, **changed,
                   overrides=["checkpoint.resume_changes=[run.max_steps,train.global_batch_size]"])
    state = json.loads((root / "step_00000006" / "state.json").read_text())
    rows = json.loads((run_dir / "results.json").read_text())["data"]["coverage"]["rows"]
    assert state["consumed_samples"] == 32 + 2 * 16 and state["epoch"] == 64 // rows
    cfg = load_recipe(tmp_path / "r" / "recipe.yaml")
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(run_dir) if "train/lr" in m}
    assert lrs[5] == pytest.approx(lr_at(4, cfg, 6), rel=1e-9)
    assert lrs[4] == pytest.approx(lr_at(3, cfg, 4), rel=1e-9)
    assert f"learning rate of step 5: {lr_at(4, cfg, 4):.6g} under the checkpoint's schedule (4 steps), " \
           f"{lr_at(4, cfg, 6):.6g} under the recipe's (6 steps)" in proc.stdout
    events = [m for m in read_metrics(run_dir) if m.get("event") == "resume_changes"]
    assert sorted(c["key"] for c in events[0]["changes"]) == ["run.max_steps", "train.global_batch_size"]
