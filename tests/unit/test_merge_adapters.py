"""Adapters as merge parents: an adapter (ours or Hugging Face PEFT) takes part as its base with the update folded
in, tensor by tensor; the fold agrees with the merged export (Megatron's own `merge()` on the shards), parents
must share one base, and methods that do not fold are refused before anything is written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nemo_adapt.cli import main
from tests.conftest import write_tiny_hf_checkpoint

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):  # Qwen2-style: q/k/v biases, which an IA3 output scale must scale too
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf_base") / "tiny_qwen2", name="tiny_qwen2")


def _artifact(base_dir, out, peft: dict):
    from nemo_adapt.peft.base import peft_config_class
    from tests.unit.test_hf_peft_export_dora_ia3 import _trained_artifact

    _trained_artifact(base_dir, out, peft_config_class(peft["method"])(**peft))
    return out


def _merge(tmp_path, name: str, spec: dict) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"dtype": "float32", "out": str(tmp_path / name), **spec}))
    assert main(["merge", str(path)]) == 0
    return load_file(str(tmp_path / name / "model.safetensors"))


@pytest.mark.parametrize("peft", [{"method": "lora", "rank": 4, "alpha": 8}, {"method": "dora", "rank": 4, "alpha": 8},
                                  {"method": "ia3"}], ids=["lora", "dora", "ia3"])
def test_an_adapter_parent_is_the_merged_export(tmp_path, base_dir, peft):
    art = _artifact(base_dir, tmp_path / "art", peft)
    assert main(["export", str(tmp_path / "exported"), "--adapter", str(art)]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    merged = _merge(tmp_path, "merged", {"merge_method": "linear", "models": [{"model": str(art)}]})
    base = load_file(str(base_dir / "model.safetensors"))
    assert merged.keys() == exported.keys()
    worst = max((merged[k] - exported[k]).abs().max().item() for k in merged)
    assert worst <= 1e-6, f"the streamed fold differs from the merged export by {worst}"
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    if peft["method"] == "ia3":  # k/v rows (weights and biases) and down_proj columns, nothing else
        assert {k.split(".", 3)[3] for k in changed} == {"self_attn.k_proj.weight", "self_attn.k_proj.bias",
                                                         "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                                         "mlp.down_proj.weight"}
    else:
        assert changed and all(k.endswith("proj.weight") for k in changed)
    lineage = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    parent = lineage["models"][0]
    assert parent["format"] == "nemo-adapt" and parent["method"] == peft["method"]
    assert parent["sha256"] and parent["base_model_fingerprint"].startswith("tiny_qwen2@")
    assert lineage["status"] == "unvalidated"


def test_task_arithmetic_of_two_adapters_adds_their_deltas(tmp_path, base_dir):
    """base + 1.0 * (lora delta) + 1.0 * (HF PEFT DoRA delta), each delta from its own merged export."""
    from peft import LoraConfig, TaskType

    from tests.unit.test_hf_peft_import import _peft_made

    a = _artifact(base_dir, tmp_path / "a", {"method": "lora", "rank": 4, "alpha": 8})
    _peft_made(base_dir, tmp_path / "b", LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4, use_dora=True,
                                                    target_modules=["q_proj", "up_proj"]))
    for name, adapter in (("a_exported", a), ("b_exported", tmp_path / "b")):
        assert main(["export", str(tmp_path / name), "--adapter", str(adapter), "--checkpoint", str(base_dir)]) == 0
    ea, eb = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a_exported", "b_exported"))
    base = load_file(str(base_dir / "model.safetensors"))
    merged = _merge(tmp_path, "sum", {"merge_method": "task_arithmetic", "base_model": str(base_dir),
                                      "models": [{"model": str(a)}, {"model": str(tmp_path / "b")}],
                                      "parameters": {"lambda": 1.0}})
    worst = max((merged[k] - (base[k] + (ea[k] - base[k]) + (eb[k] - base[k]))).abs().max().item() for k in merged)
    assert worst <= 1e-5
    formats = [m["format"] for m in json.loads((tmp_path / "sum" / "merge_config.json").read_text())["models"]]
    assert formats == ["nemo-adapt", "hf-peft"]


def test_adapter_parents_are_refused_before_anything_is_written(tmp_path, base_dir, capsys):
    other = write_tiny_hf_checkpoint(tmp_path / "other", name="tiny_qwen2", seed=5)
    mine = _artifact(base_dir, tmp_path / "mine", {"method": "lora", "rank": 4, "alpha": 8})
    theirs = _artifact(other, tmp_path / "theirs", {"method": "lora", "rank": 4, "alpha": 8})
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    import dataclasses

    from nemo_adapt.peft.base import peft_config_class

    settings = dataclasses.asdict(peft_config_class("prompt_tuning")())  # every setting, as save_adapter writes
    (prompt / "adapter_config.json").write_text(json.dumps({"peft": settings, "base_checkpoint": str(base_dir)}))
    (prompt / "adapter_model.safetensors").write_bytes(b"")
    cases = [
        ({"merge_method": "linear", "models": [{"model": str(mine)}, {"model": str(theirs)}]},
         "the adapters belong to different base models"),
        ({"merge_method": "task_arithmetic", "base_model": str(other), "models": [{"model": str(mine)}]},
         "the adapter was trained on base model"),
        ({"merge_method": "linear", "models": [{"model": str(mine)}, {"model": str(prompt)}]},
         "peft.method=prompt_tuning cannot be merged into the base weights"),
    ]
    for i, (spec, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(json.dumps({"out": str(tmp_path / "out"), **spec}))
        assert main(["merge", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err, (i, err)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "a partial output was left"


def test_validate_scores_the_merge_on_a_run_task_and_records_it(tmp_path, capsys, monkeypatch):
    """`--validate RUN_DIR`: the run's test split scores the merged model right after merging; the status,
    scores and thresholds land in merge_config.json; a bad task is refused before anything is written."""
    from nemo_adapt.config import load_recipe, save_resolved
    from nemo_adapt.models.loader import resolve_path
    from tests.conftest import write_tiny_chat_data, write_tiny_recipe

    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    data = write_tiny_chat_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path, data, eval={"enabled": True, "max_new_tokens": 6})
    save_resolved(load_recipe(recipe), run_dir / "config.yaml")
    base = str(resolve_path("random:tiny_llama"))  # has a tokenizer, which the merge carries over
    merge_file = tmp_path / "m.yaml"
    merge_file.write_text(json.dumps({"merge_method": "linear", "models": [base, base], "dtype": "float32",
                                      "out": str(tmp_path / "merged")}))

    # No threshold: the run recorded no baseline, so --min-exact-match is needed; refused before writing.
    assert main(["merge", str(merge_file), "--validate", str(run_dir)]) == 2
    assert "recorded no prompt-only baseline" in capsys.readouterr().err
    assert main(["merge", str(merge_file), "--validate", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()

    assert main(["merge", str(merge_file), "--validate", str(run_dir), "--min-exact-match", "0"]) == 0
    record = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert record["status"] == "validated"
    (outcome,) = record["validation"]
    assert outcome["n"] == 16 and outcome["threshold"] == 0.0 and outcome["passed"] is True
    assert outcome["test_sha256"] and outcome["threshold_from"] == "--min-exact-match"
    assert "validate" in capsys.readouterr().out

    # A threshold the random model cannot reach: recorded as failed, exit status 1.
    (run_dir / "results.json").write_text(json.dumps({"eval": {"adapted": {"exact_match": 0.9},
                                                               "baseline": {"exact_match": 0.5}}}))
    assert main(["merge", str(merge_file), "--validate", str(run_dir)]) == 1
    record = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert record["status"] == "failed_validation" and record["validation"][0]["threshold"] == 0.5
    assert "FAIL" in capsys.readouterr().out


def test_ours_and_an_hf_peft_adapter_merge_over_a_base_opened_under_another_name(tmp_path, base_dir):
    """The same base files, wherever they lie and however they are named, have one fingerprint: a checkpoint opened
    without naming its architecture takes the registered name it matches, so our adapter (trained under the
    registered name) and an HF PEFT adapter (which names none) are parents of one merge."""
    import shutil

    from peft import LoraConfig, TaskType

    from nemo_adapt.models.loader import base_fingerprint, open_source
    from tests.unit.test_hf_peft_import import _peft_made

    copy = tmp_path / "downloaded_under_another_name"
    shutil.copytree(base_dir, copy)
    assert open_source(str(copy)).spec.name == "tiny_qwen2"
    assert base_fingerprint(open_source(str(copy))) == base_fingerprint(open_source(str(base_dir), "tiny_qwen2"))
    ours = _artifact(base_dir, tmp_path / "ours", {"method": "lora", "rank": 4, "alpha": 8})
    _peft_made(copy, tmp_path / "theirs", LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4,
                                                     target_modules=["v_proj"]))
    merged = _merge(tmp_path, "mixed", {"merge_method": "linear", "base_model": str(copy),
                                        "models": [{"model": str(ours)}, {"model": str(tmp_path / "theirs")}]})
    assert merged
    lineage = json.loads((tmp_path / "mixed" / "merge_config.json").read_text())
    assert len({m["base_model_fingerprint"] for m in lineage["models"]}) == 1
