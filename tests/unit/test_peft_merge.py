"""Merge/unmerge of the foldable methods (LoRA, DoRA, IA3) in fp32 on one process.

Adapters are first perturbed to non-trivial values (fresh ones equal the base model, which would make
every comparison pass), then: merged model == unmerged adapted model (1e-5), unmerge restores the
base weights and outputs (1e-5). tiny_qwen2 has a linear_qkv bias, which DoRA must not rescale and
IA3 must scale with the key/value rows. The same checks run at TP2, PP2 and TP2xPP2 in the battery.
"""

import pytest
import torch

from nemo_adapt.models.builder import build_model
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.parallel import runtime
from nemo_adapt.peft.base import adapters_disabled, apply_peft, peft_config_class

pytestmark = pytest.mark.megatron

CASES = {
    "lora": {"method": "lora", "rank": 4, "alpha": 8},
    "dora": {"method": "dora", "rank": 4, "alpha": 8},
    "dora_partial": {"method": "dora", "rank": 2, "alpha": 2, "target_modules": ["linear_qkv", "linear_fc2"]},
    "ia3": {"method": "ia3"},
    "ia3_values": {"method": "ia3", "targets": ["values"]},
}


def _logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, None).float()


@torch.no_grad()
def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not getattr(p, "is_adapter", False):
            continue
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(("scaling.keys", "scaling.values", "scaling.ffn")):
            p.mul_(1 + 0.3 * noise)  # IA3 vectors around 1
        elif name.endswith("magnitude.weight"):
            p.mul_(1 + 0.2 * noise)
        else:
            p.add_(0.1 * noise)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_adapted_and_unmerge_restores_base(model_name, case):
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    torch.manual_seed(0)
    spec = get_model_spec(model_name)
    model = build_model(spec)
    model.eval()
    with torch.no_grad():  # Megatron starts biases at zero, which would hide a bias handled wrongly
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(3, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    base = _logits(model, tokens)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    peft = CASES[case]
    apply_peft(model, peft_config_class(peft["method"])(**peft), seed=0)
    _perturb(model, seed=2)
    adapted = _logits(model, tokens)
    assert (adapted - base).abs().max() > 1e-2, "perturbed adapters should change the outputs"

    layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "adapter_enabled")]
    assert layers
    for m in layers:
        m.merge()
    merged = _logits(model, tokens)
    assert (merged - adapted).abs().max() <= 1e-5
    with adapters_disabled(model):  # merged: the base weights now carry the update
        assert (_logits(model, tokens) - adapted).abs().max() <= 1e-5

    for m in layers:
        m.unmerge()
    assert (_logits(model, tokens) - adapted).abs().max() <= 1e-5
    with adapters_disabled(model):
        assert (_logits(model, tokens) - base).abs().max() <= 1e-5
    for n, p in model.named_parameters():
        if not getattr(p, "is_adapter", False):
            original = base_weights[n.replace(".base_layer.", ".")]
            assert (p - original).abs().max() <= 1e-5, f"{n} not restored by unmerge"


def test_ia3_scales_exactly_the_key_and_value_rows_of_fused_qkv():
    """Megatron's fused layout per KV group is [its query heads, key, value]; checked against the
    HF<->Megatron splitter (`weights._split_qkv`) on a model with 3 query heads per group, so a mix-up
    of groups, heads or q/k/v order shows."""
    import dataclasses

    from nemo_adapt.models.weights import _split_qkv

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    torch.manual_seed(0)
    spec = dataclasses.replace(get_model_spec("tiny_qwen2"), name="tiny_qwen2_gqa3", hidden_size=96,
                               num_attention_heads=6, num_query_groups=2, num_layers=1)
    model = build_model(spec)
    apply_peft(model, peft_config_class("ia3")(), seed=0)
    _perturb(model, seed=4)
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    x = torch.randn(5, 1, spec.hidden_size)
    with torch.no_grad():
        scaled, _ = qkv(x)
        with adapters_disabled(model):
            plain, _ = qkv(x)
    q0, k0, v0 = _split_qkv(spec, plain.reshape(5, -1).T)
    q1, k1, v1 = _split_qkv(spec, scaled.reshape(5, -1).T)
    lk, lv = qkv.scaling.keys.detach(), qkv.scaling.values.detach()
    assert lk.shape == (spec.num_query_groups * spec.kv_channels,)
    assert (lk - 1).abs().max() > 0.05  # perturbed: the checks below can fail
    torch.testing.assert_close(q1, q0, rtol=0, atol=1e-6)
    torch.testing.assert_close(k1, k0 * lk[:, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(v1, v0 * lv[:, None], rtol=0, atol=1e-6)
