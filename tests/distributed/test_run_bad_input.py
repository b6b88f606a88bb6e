"""Bad input to `nemo-adapt run` fails with a message naming the file, line or key, before any training,
and leaves no run directory behind; on an existing run it leaves the checkpoints exactly as they were."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import torchrun, train_losses, write_tiny_chat_data, write_tiny_recipe

pytestmark = [pytest.mark.megatron, pytest.mark.slow]
RUN = "-m nemo_adapt.cli"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"NEMO_ADAPT_CACHE": str(tmp_path_factory.mktemp("cache"))}


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _fails(recipe: Path, env: dict, *overrides: str) -> str:
    proc = torchrun(1, RUN, "run", str(recipe), *overrides, env=env, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr


def test_bad_inputs_leave_no_run_directory(tmp_path, env):
    data = write_tiny_chat_data(tmp_path / "data", rows=32)
    recipe = write_tiny_recipe(tmp_path, data)
    run_dir = tmp_path / "run"

    lines = data["train"].read_text().splitlines()
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text("\n".join([*lines[:2], '{"messages": [', *lines[3:]]) + "\n")
    err = _fails(recipe, env, f"data.train={bad_json}")
    assert f"{bad_json}:3" in err
    assert not run_dir.exists()

    record = json.loads(lines[4])
    record["messages"][-1]["content"] = ""
    empty_answer = tmp_path / "empty_answer.jsonl"
    empty_answer.write_text("\n".join([*lines[:4], json.dumps(record), *lines[5:]]) + "\n")
    err = _fails(recipe, env, f"data.train={empty_answer}")
    assert f"{empty_answer}:5" in err and "empty" in err
    assert not run_dir.exists()

    err = _fails(recipe, env, "train.micro_batch=2")
    assert "micro_batch_size" in err
    err = _fails(recipe, env, "model.checkpoint=/nonexistent/model")
    assert "/nonexistent/model" in err
    err = _fails(recipe, env, "parallel.tensor=3")
    assert "parallel.tensor=3" in err
    assert not run_dir.exists()


def test_bad_input_on_an_existing_run_keeps_its_checkpoint(tmp_path, env):
    data = write_tiny_chat_data(tmp_path / "data", rows=32)
    recipe = write_tiny_recipe(tmp_path, data, run={"max_steps": 2})
    run_dir = tmp_path / "run"
    torchrun(1, RUN, "run", str(recipe), env=env)
    before = _tree_digest(run_dir / "checkpoints")
    assert (run_dir / "checkpoints" / "latest").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(data["train"].read_text() + "not json\n")
    err = _fails(recipe, env, f"data.train={bad}", "run.max_steps=4")
    assert f"{bad}:33" in err
    assert _tree_digest(run_dir / "checkpoints") == before

    # The adapter checkpoint belongs to its base model (fingerprint stored with it): resuming it on
    # another base of the same shapes is refused before training, and the checkpoint stays as it was.
    err = _fails(recipe, env, "model.name=tiny_qwen2", "model.checkpoint=random:tiny_qwen2", "run.max_steps=4")
    assert "was trained on base model tiny_llama@" in err and "model.checkpoint is tiny_qwen2@" in err, err[-2000:]
    assert _tree_digest(run_dir / "checkpoints") == before
    assert sorted(train_losses(run_dir)) == [1, 2]

    # `nemo-adapt eval` checks the same fingerprint before building the model: a copy of the run whose
    # config now names another base is refused, with the adapter's description named.
    other = tmp_path / "other_base"
    shutil.copytree(run_dir, other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("tiny_llama", "tiny_qwen2"))
    proc = torchrun(1, RUN, "eval", str(other), env=env, check=False)
    assert proc.returncode != 0 and "adapter_config.json: the adapter was trained on base model tiny_llama@" in proc.stderr, (
        proc.stderr[-2000:])
    assert not (other / "eval.json").exists()

    # The good command resumes from the untouched step-2 checkpoint.
    torchrun(1, RUN, "run", str(recipe), "run.max_steps=4", env=env)
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
