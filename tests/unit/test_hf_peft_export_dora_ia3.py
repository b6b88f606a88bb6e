"""`nemo-adapt export OUT --adapter DIR --format peft` for DoRA and IA3: Hugging Face PEFT loads the export and
computes our logits and our greedy continuations, on a Qwen2-style base (qkv bias, untied) and a Llama-style one
(tied embeddings); the written tensors are the artifact's, in its dtype."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nemo_adapt.cli import main
from tests.conftest import write_tiny_hf_checkpoint
from tests.unit.test_hf_peft_export import PROMPTS

pytestmark = pytest.mark.megatron
NEW_TOKENS = 16

CASES = {
    "dora_all_linear": ("dora", {}),
    "dora_fused_only_some_layers": ("dora", {"target_modules": ["linear_qkv", "linear_fc1"], "layers": [1, 3]}),
    "ia3": ("ia3", {}),
}


@pytest.fixture(scope="module", params=["tiny_qwen2", "tiny_llama"])
def base_dir(request, tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf_base") / request.param, name=request.param)


def _config(method: str, settings: dict):
    from nemo_adapt.peft.dora import DoRAConfig
    from nemo_adapt.peft.ia3 import IA3Config

    return DoRAConfig(rank=4, alpha=8, **settings) if method == "dora" else IA3Config(**settings)


@torch.no_grad()
def _randomise(model) -> None:
    """Move every adapter parameter away from its identity start, as training would."""
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if not getattr(p, "is_adapter", False):
            continue
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("magnitude.weight"):
            p.mul_(1 + 0.3 * noise)  # DoRA magnitude: a rescaled row norm
        elif ".scaling." in name:
            p.copy_(1 + 0.5 * noise)  # IA3 vectors start at one
        else:
            p.copy_(0.2 * noise)  # LoRA A and B


def _trained_artifact(base_dir, out, config):
    """Our adapted model's logits and greedy continuations, and its artifact written to `out`."""
    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate
    from nemo_adapt.models.loader import base_fingerprint, load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    source = open_source(str(base_dir))
    model, source = load_model(source)
    spec = source.spec
    apply_peft(model, config, seed=0)
    _randomise(model)
    logits = forward_logits(model, PROMPTS, spec.vocab_size, spec.hidden_size)
    tokens = generate(model, PROMPTS.tolist(), SamplingParams(max_new_tokens=NEW_TOKENS), set(), spec.vocab_size,
                      spec.hidden_size)  # no stop ids: always NEW_TOKENS tokens
    meta = {"base_model": spec.name, "base_checkpoint": str(base_dir), "base_model_fingerprint": base_fingerprint(source)}
    save_adapter(model, out, config, meta)
    save_adapter(model, out.with_name(out.name + "_bf16"), config, meta, dtype=torch.bfloat16)
    return logits, tokens, spec


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_loads_our_export_and_gives_our_logits_and_greedy_tokens(tmp_path, base_dir, case):
    import transformers
    from peft import PeftModel

    from nemo_adapt.peft.base import get_peft_method

    method, settings = CASES[case]
    config = _config(method, settings)
    art, out = tmp_path / "artifact", tmp_path / "peft"
    ours, our_tokens, spec = _trained_artifact(base_dir, art, config)
    assert main(["export", str(out), "--adapter", str(art), "--format", "peft"]) == 0

    written = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert written["base_model_name_or_path"] == str(base_dir) and written["nemo_adapt"]["method"] == method
    if method == "dora":
        assert written["peft_type"] == "LORA" and written["use_dora"] is True and written["r"] == 4
        expected_targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        layers = settings.get("layers", range(spec.num_layers))
        if settings:
            expected_targets = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
            assert written["layers_to_transform"] == settings["layers"]
        assert set(written["target_modules"]) == expected_targets
        magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
        assert len(magnitudes) == len(layers) * len(expected_targets)
        assert len(tensors) == 3 * len(magnitudes)  # A, B and m per projection
        kv = spec.num_query_groups * spec.kv_channels
        rows = {"q_proj": spec.hidden_size, "k_proj": kv, "v_proj": kv, "o_proj": spec.hidden_size,
                "gate_proj": spec.ffn_hidden_size, "up_proj": spec.ffn_hidden_size, "down_proj": spec.hidden_size}
        for key, m in magnitudes.items():
            assert m.shape == (rows[key.split(".")[-2]],), key
    else:
        assert written["peft_type"] == "IA3"
        assert set(written["target_modules"]) == {"k_proj", "v_proj", "down_proj"}
        assert written["feedforward_modules"] == ["down_proj"]
        kv = spec.num_query_groups * spec.kv_channels
        for layer in range(spec.num_layers):
            prefix = f"base_model.model.model.layers.{layer}"
            assert tensors[f"{prefix}.self_attn.k_proj.ia3_l"].shape == (kv, 1)  # scales the output
            assert tensors[f"{prefix}.self_attn.v_proj.ia3_l"].shape == (kv, 1)
            assert tensors[f"{prefix}.mlp.down_proj.ia3_l"].shape == (1, spec.ffn_hidden_size)  # scales the input
        assert len(tensors) == 3 * spec.num_layers

    # Re-read files hold exactly what the mapping produced, in the artifact's dtype (fp32 and bf16 alike).
    mapped = get_peft_method(method).to_hf_peft(config, load_file(str(art / "adapter_model.safetensors")), spec)[1]
    assert tensors.keys() == mapped.keys()
    assert all(tensors[k].dtype == torch.float32 and torch.equal(tensors[k], mapped[k]) for k in tensors)
    out_bf16 = tmp_path / "peft_bf16"
    assert main(["export", str(out_bf16), "--adapter", str(tmp_path / "artifact_bf16"), "--format", "peft"]) == 0
    tensors_bf16 = load_file(str(out_bf16 / "adapter_model.safetensors"))
    assert tensors_bf16.keys() == tensors.keys()
    assert all(tensors_bf16[k].dtype == torch.bfloat16 and torch.equal(tensors_bf16[k], tensors[k].to(torch.bfloat16))
               for k in tensors)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with torch.no_grad():
        base_logits = hf(PROMPTS).logits
    peft_model = PeftModel.from_pretrained(hf, str(out))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(PROMPTS).logits
    assert (theirs - base_logits).abs().max() > 1e-2, "the exported adapter changed nothing"
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff:.3g}"

    generation = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                               pad_token_id=0)
    with torch.no_grad():
        sequences = peft_model.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS),
                                        generation_config=generation)
    assert sequences[:, PROMPTS.shape[1]:].tolist() == our_tokens


def test_dora_export_refuses_an_artifact_without_its_magnitudes():
    from nemo_adapt.errors import ConfigError
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.peft.dora import DoRA, DoRAConfig

    spec = get_model_spec("tiny_llama")
    prefix = "decoder.layers.0.mlp.linear_fc2"
    tensors = {f"{prefix}.adapter.down.weight": torch.zeros(4, spec.ffn_hidden_size),
               f"{prefix}.adapter.up.weight": torch.zeros(spec.hidden_size, 4)}
    config = DoRAConfig(rank=4, alpha=8, target_modules=["linear_fc2"])
    with pytest.raises(ConfigError, match="lack either the LoRA pair or the magnitude vector"):
        DoRA.to_hf_peft(config, tensors, spec)
    tensors[f"{prefix}.magnitude.weight"] = torch.ones(spec.hidden_size + 1)
    with pytest.raises(ConfigError, match="output rows"):
        DoRA.to_hf_peft(config, tensors, spec)
    tensors[f"{prefix}.magnitude.weight"] = torch.ones(spec.hidden_size)
    fields, out = DoRA.to_hf_peft(config, tensors, spec)
    assert fields["use_dora"] is True
    assert out["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"].shape == (spec.hidden_size,)
