"""`nemo-adapt export OUT --adapter DIR --format peft` for the virtual-token methods: Hugging Face PEFT loads
prompt tuning and p-tuning (collapsed) as PROMPT_TUNING and prefix tuning (collapsed, keys rotated to the
position HF gives the real tokens) as PREFIX_TUNING, and computes our logits and our greedy continuations."""

import json

import pytest
import torch

from nemo_adapt.cli import main
from tests.conftest import write_tiny_hf_checkpoint
from tests.unit.test_hf_peft_export import PROMPTS

pytestmark = pytest.mark.megatron
NEW_TOKENS = 16

# (id, method config kwargs, HF peft_type); every adapter weight is randomised before export.
CASES = [
    ("prompt_tuning", {"method": "prompt_tuning", "num_virtual_tokens": 5, "init": "random"}, "PROMPT_TUNING"),
    ("p_tuning_mlp", {"method": "p_tuning", "num_virtual_tokens": 5, "encoder": "mlp", "encoder_hidden": 48,
                      "encoder_layers": 3}, "PROMPT_TUNING"),
    ("p_tuning_lstm", {"method": "p_tuning", "num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden": 16,
                       "encoder_layers": 1}, "PROMPT_TUNING"),
    ("prefix_tuning_mlp", {"method": "prefix_tuning", "num_prefix_tokens": 6, "reparam_hidden": 32}, "PREFIX_TUNING"),
    ("prefix_tuning_direct", {"method": "prefix_tuning", "num_prefix_tokens": 3, "reparameterize": False},
     "PREFIX_TUNING"),
]


@pytest.fixture(scope="module", params=["tiny_qwen2", "tiny_llama"])
def base_dir(request, tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf_base") / request.param, name=request.param)


def _trained_artifact(base_dir, out, peft: dict):
    """Our adapted model's logits on PROMPTS and its greedy continuations; the adapter saved as training does."""
    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate
    from nemo_adapt.models.loader import base_fingerprint, load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft, peft_config_class

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    source = open_source(str(base_dir))
    model, source = load_model(source)
    spec = source.spec
    cfg = peft_config_class(peft["method"])(**peft)
    apply_peft(model, cfg, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as training would leave them: every adapter weight away from its init
        for p in model.parameters():
            if getattr(p, "is_adapter", False):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    logits = forward_logits(model, PROMPTS, spec.vocab_size, spec.hidden_size)
    tokens = generate(model, PROMPTS.tolist(), SamplingParams(max_new_tokens=NEW_TOKENS), set(), spec.vocab_size,
                      spec.hidden_size)
    save_adapter(model, out, cfg, {"base_model": spec.name, "base_checkpoint": str(base_dir),
                                   "base_model_fingerprint": base_fingerprint(source)})
    return logits, tokens


@pytest.mark.parametrize("peft,peft_type", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hf_peft_loads_our_virtual_token_export_and_gives_our_logits_and_tokens(tmp_path, base_dir, peft, peft_type):
    import transformers
    from peft import PeftModel

    art, out = tmp_path / "artifact", tmp_path / "peft"
    ours, our_tokens = _trained_artifact(base_dir, art, peft)
    assert main(["export", str(out), "--adapter", str(art), "--format", "peft"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["base_model_name_or_path"] == str(base_dir)
    assert config["nemo_adapt"]["method"] == peft["method"] and config["nemo_adapt"]["base_model_fingerprint"]
    if peft["method"] == "p_tuning":
        assert config["nemo_adapt"]["exported_as"] == "prompt_tuning (p-tuning prompt encoder collapsed to its table)"
    if peft_type == "PREFIX_TUNING":  # one prefix per KV head (query group), as HF PEFT sizes it under GQA
        assert (config["num_attention_heads"], config["token_dim"], config["prefix_projection"]) == (2, 32, False)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(PROMPTS).logits
        base_tokens = hf.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)[:, PROMPTS.shape[1]:]
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=PROMPTS).logits[:, -PROMPTS.shape[1]:]  # the real tokens' positions
        # eos disabled (both sides run all 16 steps); equal-length prompts need no padding. use_cache=False:
        # peft 0.21.2's prepare_inputs_for_generation looks for the KV cache under `past_key_values`, which
        # transformers 5's generate passes as `cache`, so with a cache every decode step prepends the virtual
        # tokens again (prompt/p-tuning) or starts a fresh prefix-only cache (prefix tuning) and the
        # continuation is wrong; without one each step re-runs the whole sequence through PeftModel.forward.
        generated = peft_model.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False,
                                        max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                                        use_cache=False)
    assert (theirs - base_logits).abs().max() > 1e-2, "the exported adapter changed nothing"
    assert (theirs - ours).abs().max() <= 1e-4
    assert generated[:, PROMPTS.shape[1]:].tolist() == our_tokens
    if base_dir.name == "tiny_qwen2":
        # (tiny_llama's tied embeddings make it repeat the last prompt token, adapter or not)
        assert our_tokens != base_tokens.tolist(), "the adapter did not change the continuation"


def test_prefix_export_without_rotating_the_keys_would_not_match(tmp_path, base_dir):
    """The rotation of the exported prefix keys is what makes HF's positions (real tokens after the prefix)
    give our scores: the same table with the keys rotated back (position 0) gives other logits."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.peft.prefix_tuning import _rotary_inv_freq

    art, out = tmp_path / "artifact", tmp_path / "peft"
    peft = CASES[-1][1]
    ours, _ = _trained_artifact(base_dir, art, peft)
    assert main(["export", str(out), "--adapter", str(art), "--format", "peft"]) == 0
    spec = get_model_spec(base_dir.name)
    n, g, d = peft["num_prefix_tokens"], spec.num_query_groups, spec.kv_channels
    table = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"].view(n, spec.num_layers, 2, g, d)
    angle = -n * _rotary_inv_freq(spec).double()
    cos, sin = torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin()
    key = table[:, :, 0].double()
    x1, x2 = key.chunk(2, dim=-1)
    table[:, :, 0] = (key * cos + torch.cat([-x2, x1], dim=-1) * sin).float()
    save_file({"prompt_embeddings": table.reshape(n, -1).contiguous()}, str(out / "adapter_model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        unrotated = PeftModel.from_pretrained(hf, str(out)).eval()(input_ids=PROMPTS).logits
    assert (unrotated - ours).abs().max() > 1e-3


def test_export_refuses_an_artifact_without_the_methods_tensors(tmp_path):
    from nemo_adapt.errors import ConfigError
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.peft.base import get_peft_method, peft_config_class

    spec = get_model_spec("tiny_qwen2")
    table = {"virtual_prompt.prompt": torch.zeros(4, 64)}
    for method, kwargs, tensors, match in (
            ("prompt_tuning", {"num_virtual_tokens": 5}, table, r"should be \[5, 64\], got \[4, 64\]"),
            ("p_tuning", {"num_virtual_tokens": 4}, {}, "neither virtual_prompt.encoder"),
            ("p_tuning", {"num_virtual_tokens": 4, "encoder": "lstm"},
             {"virtual_prompt.encoder.embedding": torch.zeros(4, 64)}, "do not fit peft.encoder=lstm"),
            ("prefix_tuning", {"num_prefix_tokens": 4}, table, "layer 0's prefixes are missing")):
        with pytest.raises(ConfigError, match=match):
            get_peft_method(method).to_hf_peft(peft_config_class(method)(method=method, **kwargs), tensors, spec)
