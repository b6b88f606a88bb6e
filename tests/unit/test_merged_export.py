"""`nemo-adapt export OUT --adapter DIR`: the adapter folded into the base weights, written as a plain Hugging Face
model that `transformers` loads and that computes what our adapted model and HF PEFT's `merge_and_unload()` do."""

import json

import pytest
import torch

from nemo_adapt.cli import main
from tests.conftest import write_tiny_hf_checkpoint
from tests.unit.test_hf_peft_export import PROMPTS

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module", params=["tiny_qwen2", "tiny_llama"])
def base_dir(request, tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf_base") / request.param, name=request.param)


def _logits(directory) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPTS).logits


def _merge_and_unload(base_dir, peft_dir) -> torch.Tensor:
    import transformers
    from peft import PeftModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(hf, str(peft_dir)).merge_and_unload().eval()
    with torch.no_grad():
        return merged(PROMPTS).logits


@pytest.mark.parametrize("peft", [
    {"method": "lora", "rank": 4, "alpha": 8},
    {"method": "lora", "rank": 3, "alpha": 5, "target_modules": ["linear_qkv", "linear_fc1"], "layers": [1, 3]},
    {"method": "dora", "rank": 4, "alpha": 8},
    {"method": "ia3"},
], ids=["lora", "lora_fused_some_layers", "dora", "ia3"])
def test_merged_export_equals_our_adapted_model_and_merge_and_unload(tmp_path, base_dir, peft):
    from nemo_adapt.peft.base import peft_config_class
    from tests.unit.test_hf_peft_export_dora_ia3 import _trained_artifact

    art = tmp_path / "artifact"
    ours = _trained_artifact(base_dir, art, peft_config_class(peft["method"])(**peft))[0]
    assert main(["export", str(tmp_path / "merged"), "--adapter", str(art)]) == 0
    assert main(["export", str(tmp_path / "peft"), "--adapter", str(art), "--format", "peft"]) == 0
    merged = _logits(tmp_path / "merged")
    assert (merged - _logits(base_dir)).abs().max() > 1e-2, "the merge changed nothing"
    assert (merged - ours).abs().max() <= 1e-4
    assert (merged - _merge_and_unload(base_dir, tmp_path / "peft")).abs().max() <= 1e-4
    # A plain model: no adapter files, and the names and shapes of the base's own files.
    from safetensors.torch import load_file

    got, base = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "merged", base_dir))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in base.items()}
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    # --dtype: folded in float32, then cast (not folded in bfloat16).
    assert main(["export", str(tmp_path / "merged_bf16"), "--adapter", str(art), "--dtype", "bfloat16"]) == 0
    bf16 = load_file(str(tmp_path / "merged_bf16" / "model.safetensors"))
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], got[k].to(torch.bfloat16)) for k in got)


def test_merged_export_of_an_adapter_made_by_hf_peft(tmp_path, base_dir):
    """An HF PEFT LoRA with its own A per projection (q, v) and a DoRA: merged here as merge_and_unload does."""
    from peft import LoraConfig, TaskType

    from tests.unit.test_hf_peft_import import _peft_made

    for name, config in {
        "lora": LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "dora": LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4, use_dora=True,
                           target_modules=["k_proj", "o_proj", "gate_proj"]),
    }.items():
        _peft_made(base_dir, tmp_path / name, config)
        out = tmp_path / f"{name}_merged"
        assert main(["export", str(out), "--adapter", str(tmp_path / name), "--checkpoint", str(base_dir)]) == 0
        diff = (_logits(out) - _merge_and_unload(base_dir, tmp_path / name)).abs().max().item()
        assert diff <= 1e-4, (name, diff)


def test_merged_export_refuses_methods_that_do_not_fold_before_writing(tmp_path, capsys):
    import dataclasses

    from nemo_adapt.peft.base import peft_config_class

    base = write_tiny_hf_checkpoint(tmp_path / "base", name="tiny_llama")
    for method, words in (("prefix_tuning", "--format peft, PREFIX_TUNING"),
                          ("prompt_tuning", "--format peft, PROMPT_TUNING"),
                          ("p_tuning", "--format peft, PROMPT_TUNING"),
                          ("adapter", "Houlsby adapters add non-linear layers")):
        art = tmp_path / method
        art.mkdir()
        settings = dataclasses.asdict(peft_config_class(method)())  # every setting, as save_adapter writes
        (art / "adapter_config.json").write_text(json.dumps({"peft": settings, "base_checkpoint": str(base)}))
        (art / "adapter_model.safetensors").write_bytes(b"")
        assert main(["export", str(tmp_path / "out"), "--adapter", str(art)]) == 2
        err = capsys.readouterr().err
        assert f"peft.method={method} cannot be merged into the base weights" in err and words in err, err
    assert main(["export", str(tmp_path / "out"), "--adapter", str(tmp_path / "base")]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
