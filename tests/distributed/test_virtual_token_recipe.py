"""Prompt tuning through `nemo-adapt run` end to end (one process): the virtual-token methods at every
TP/PP layout are rows of the shared PEFT battery (`test_peft_battery.py`).
"""

import json

import pytest
import yaml

from tests.conftest import torchrun, train_losses, write_tiny_chat_data, write_tiny_recipe

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_chat_data(tmp_path_factory.mktemp("virtual_data"), rows=32)


def test_prompt_tuning_recipe_trains_evaluates_and_exports(tmp_path, tiny_data, tmp_path_factory):
    """Packing refused before training, then preflight, text init through the tokenizer, training with
    packing off, adapter artifact, and evaluation by generation (adapted, and the base baseline with
    the virtual tokens switched off)."""
    peft = {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "text", "init_text": "Upper-case it"}
    env = {"NEMO_ADAPT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    recipe = write_tiny_recipe(tmp_path, tiny_data, run={"max_steps": 3},
                               eval={"enabled": True, "max_new_tokens": 3, "max_examples": 2})
    data = yaml.safe_load(recipe.read_text())
    data["peft"] = peft  # the whole section, not merged with the LoRA defaults of write_tiny_recipe
    data["data"]["packing"] = peft["method"] == "prefix_tuning"  # virtual tokens need one example per row
    recipe.write_text(f"# tiny_llama {peft['method']} test recipe\n" + yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    # Packing with virtual tokens is refused before anything is built or written.
    bad = torchrun(1, "-m nemo_adapt.cli", "run", str(recipe), "data.packing=true", env=env, check=False)
    assert bad.returncode != 0 and "data.packing=false" in bad.stderr, bad.stderr[-2000:]
    assert not run_dir.exists()
    torchrun(1, "-m nemo_adapt.cli", "run", str(recipe), env=env)
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    results = json.loads((run_dir / "results.json").read_text())
    assert {"adapted", "baseline"} <= set(results["eval"])
    # Every test record's prediction is kept next to results.json, in test-file order.
    for label in ("adapted", "baseline"):
        rows = [json.loads(line) for line in (run_dir / f"predictions_{label}.jsonl").read_text().splitlines()]
        assert [r["line"] for r in rows] == [1, 2] and sum(r["correct"] for r in rows) == results["eval"][label]["correct"]
        assert "predictions" not in results["eval"][label]
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft"]["method"] == peft["method"] and cfg["num_parameters"] == results["trainable_params"]
