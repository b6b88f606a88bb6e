"""`nemo-adapt export OUT --adapter DIR --format peft`: Hugging Face PEFT loads what we export and computes the
same logits as our adapted Megatron model (fused q/k/v and gate/up LoRA split into HF's projections)."""

import json

import pytest
import torch

from nemo_adapt.cli import main
from tests.conftest import write_tiny_hf_checkpoint

pytestmark = pytest.mark.megatron
PROMPTS = torch.tensor([[5, 17, 33, 9, 12, 8, 21, 7], [40, 41, 42, 43, 3, 4, 90, 11]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf_base") / "tiny_qwen2")


def _trained_artifact(base_dir, out, arch=None, **lora):
    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.generation.generate import forward_logits
    from nemo_adapt.models.loader import base_fingerprint, load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    source = open_source(str(base_dir), arch)
    model, source = load_model(source)
    cfg = LoRAConfig(rank=4, alpha=8, **lora)
    apply_peft(model, cfg, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: give every adapter weight a value, as training would
        for p in model.parameters():
            if getattr(p, "is_adapter", False):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    ours = forward_logits(model, PROMPTS, source.spec.vocab_size, source.spec.hidden_size)
    save_adapter(model, out, cfg, {"base_model": source.spec.name, "base_checkpoint": str(base_dir),
                                   "base_model_fingerprint": base_fingerprint(source)})
    return ours


@pytest.mark.parametrize("lora", [{}, {"target_modules": ["linear_qkv", "linear_fc1"], "layers": [1, 3]}],
                         ids=["all_linear", "fused_only_some_layers"])
def test_hf_peft_loads_our_lora_export_and_gives_our_logits(tmp_path, base_dir, lora):
    import transformers
    from peft import PeftModel

    art, out = tmp_path / "artifact", tmp_path / "peft"
    ours = _trained_artifact(base_dir, art, **lora)
    assert main(["export", str(out), "--adapter", str(art), "--format", "peft"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["nemo_adapt"]["base_model_fingerprint"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_logits = hf(PROMPTS).logits
    peft_model = PeftModel.from_pretrained(hf, str(out))
    with torch.no_grad():
        theirs = peft_model(PROMPTS).logits
    assert (theirs - base_logits).abs().max() > 1e-2, "the exported adapter changed nothing"
    assert (theirs - ours).abs().max() <= 1e-4


def test_export_refuses_another_base_and_houlsby_adapters(tmp_path, base_dir, capsys):
    art = tmp_path / "artifact"
    _trained_artifact(base_dir, art)
    other = write_tiny_hf_checkpoint(tmp_path / "other", seed=5)
    assert main(["export", str(tmp_path / "x"), "--adapter", str(art), "--format", "peft", "--base", str(other)]) == 2
    assert "the adapter was trained on base model" in capsys.readouterr().err
    meta = json.loads((art / "adapter_config.json").read_text())
    import dataclasses

    from nemo_adapt.peft.base import peft_config_class

    meta["peft"] = dataclasses.asdict(peft_config_class("adapter")())
    (art / "adapter_config.json").write_text(json.dumps(meta))
    assert main(["export", str(tmp_path / "x"), "--adapter", str(art), "--format", "peft"]) == 2
    assert "has no Hugging Face PEFT form and cannot be merged into the base weights" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "x"), "--adapter", str(tmp_path), "--format", "peft"]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "x"), "--adapter", str(art)]) == 2  # a merged export
    assert "peft.method=adapter cannot be merged into the base weights: Houlsby adapters add non-linear layers" \
        in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_of_an_adapter_trained_on_a_directory_under_a_registered_name(tmp_path, base_dir):
    """`nemo-adapt run` names the architecture (model.name) for a Hugging Face directory base; the export
    opens the base the same way, so the fingerprint it checks is the one training recorded."""
    import shutil

    hf0 = tmp_path / "hf0"
    shutil.copytree(base_dir, hf0)
    art = tmp_path / "artifact"
    _trained_artifact(hf0, art, arch="tiny_qwen2")
    assert json.loads((art / "adapter_config.json").read_text())["base_model"] == "tiny_qwen2"
    assert main(["export", str(tmp_path / "peft"), "--adapter", str(art), "--format", "peft"]) == 0
    assert main(["export", str(tmp_path / "peft2"), "--adapter", str(art), "--format", "peft", "--base", str(hf0)]) == 0
    # The export imports again on the same base: opened under the name its fingerprint was taken with.
    from nemo_adapt.artifacts.adapter import load_adapter, open_adapter, open_adapter_base

    files = open_adapter(tmp_path / "peft")
    assert files.base_model == "tiny_qwen2"
    load_adapter(files, open_adapter_base(files))
    assert main(["export", str(tmp_path / "merged"), "--adapter", str(tmp_path / "peft")]) == 0
