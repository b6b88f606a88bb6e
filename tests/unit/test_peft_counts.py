"""Trainable-parameter counts of DoRA, IA3, adapters (and LoRA): model == closed form == planner, and
== Hugging Face PEFT on the SmolLM2-135M configuration where the methods are defined alike.

Notation: L layers, h hidden, a query heads, g KV groups, d head width, f FFN width, r rank, bn bottleneck.
Megatron-Core target shapes (in -> out): linear_qkv h -> (a + 2g)d (fused Q, K, V), linear_proj ad -> h,
linear_fc1 h -> 2f (fused SwiGLU gate and up), linear_fc2 f -> h.

SmolLM2-135M: L=30, h=576, a=9, g=3, d=64, f=1536, so linear_qkv 576 -> (9 + 6) x 64 = 960,
linear_proj 576 -> 576, linear_fc1 576 -> 3072, linear_fc2 1536 -> 576.
"""

import pytest
import torch

from nemo_adapt.models.builder import build_model
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.parallel import runtime
from nemo_adapt.peft.base import apply_peft, peft_config_class, trainable_parameters
from nemo_adapt.planner.memory import peft_trainable_params

pytestmark = pytest.mark.megatron

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# Planner arguments per method (the other settings of a config add no parameters).
PLANNER_KEYS = {"lora": ("rank", "target_modules"), "dora": ("rank", "target_modules"),
                "ia3": ("targets",), "adapter": ("bottleneck", "placements", "bias")}


def closed_form(spec, peft: dict) -> int:
    """The counts written out from the method definitions, independently of the planner."""
    L, h, a, g, d, f = (spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.num_query_groups,
                        spec.kv_channels, spec.ffn_hidden_size)
    shapes = {"linear_qkv": (h, (a + 2 * g) * d), "linear_proj": (a * d, h), "linear_fc1": (h, 2 * f),
              "linear_fc2": (f, h)}
    method = peft["method"]
    if method in ("lora", "dora"):
        r = peft["rank"]
        per_layer = 0
        for t in peft.get("target_modules", ALL):
            fan_in, fan_out = shapes[t]
            per_layer += r * fan_in + r * fan_out  # A [r, in], B [out, r]
            if method == "dora":
                per_layer += fan_out  # magnitude: one per output row
        return L * per_layer
    if method == "ia3":
        widths = {"keys": g * d, "values": g * d, "ffn": f}
        return L * sum(widths[t] for t in peft.get("targets", ["keys", "values", "ffn"]))
    if method == "adapter":
        bn, bias = peft["bottleneck"], peft.get("bias", True)
        per_placement = 2 * h * bn + ((bn + h) if bias else 0)  # down [bn, h] + up [h, bn] (+ biases)
        return L * len(peft.get("placements", ["attention", "mlp"])) * per_placement
    raise AssertionError(method)


CASES = [
    {"method": "lora", "rank": 8},
    {"method": "dora", "rank": 8},
    {"method": "dora", "rank": 4, "target_modules": ["linear_proj", "linear_fc1"]},
    {"method": "ia3"},
    {"method": "ia3", "targets": ["values", "ffn"]},
    {"method": "adapter", "bottleneck": 16},
    {"method": "adapter", "bottleneck": 8, "placements": ["mlp"], "bias": False, "mode": "parallel"},
]


def _model_count(spec, peft: dict) -> int:
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    torch.manual_seed(0)
    model = build_model(spec)
    apply_peft(model, peft_config_class(peft["method"])(**peft), seed=0)
    return trainable_parameters(model)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("peft", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_model_equals_closed_form_equals_planner_tiny(name, peft):
    spec = get_model_spec(name)
    args = {k: v for k, v in peft.items() if k in PLANNER_KEYS[peft["method"]]}
    expected = closed_form(spec, peft)
    assert expected > 0
    assert _model_count(spec, peft) == expected
    assert peft_trainable_params(spec, peft["method"], **args) == expected


def test_tiny_llama_numbers_by_hand():
    """tiny_llama: L=4, h=64, a=4, g=2, d=16, f=128 -> qkv 64 -> 128, proj 64 -> 64, fc1 64 -> 256, fc2 128 -> 64."""
    spec = get_model_spec("tiny_llama")
    # DoRA r=4: qkv 4(64+128)+128 = 896, proj 4(64+64)+64 = 576, fc1 4(64+256)+256 = 1536, fc2 4(128+64)+64 = 832
    # -> 3840 per layer x 4 = 15,360
    assert closed_form(spec, {"method": "dora", "rank": 4}) == 15_360
    # IA3: keys 2x16 + values 2x16 + ffn 128 = 192 per layer x 4 = 768
    assert closed_form(spec, {"method": "ia3"}) == 768
    # adapter bn=8, both placements: 2x64x8 + 8 + 64 = 1096 per placement x 2 x 4 = 8768
    assert closed_form(spec, {"method": "adapter", "bottleneck": 8}) == 8768


@pytest.fixture(scope="module")
def smollm2():
    return get_model_spec("smollm2_135m")


@pytest.mark.slow
@pytest.mark.parametrize("peft,expected", [
    # LoRA r=8: 8(576+960) + 8(576+576) + 8(576+3072) + 8(1536+576) = 12,288 + 9,216 + 29,184 + 16,896
    # = 67,584 per layer x 30 = 2,027,520
    ({"method": "lora", "rank": 8}, 2_027_520),
    # DoRA r=8: LoRA + magnitudes 960 + 576 + 3072 + 576 = 5,184 per layer: 72,768 x 30 = 2,183,040
    ({"method": "dora", "rank": 8}, 2_183_040),
    # IA3: keys 3x64 + values 3x64 + ffn 1536 = 1,920 per layer x 30 = 57,600
    ({"method": "ia3"}, 57_600),
    # adapter bn=32, attention + mlp, biases: 2x576x32 + 32 + 576 = 37,472 per placement x 2 x 30 = 2,248,320
    ({"method": "adapter", "bottleneck": 32}, 2_248_320),
], ids=["lora", "dora", "ia3", "adapter"])
def test_smollm2_model_equals_closed_form_equals_planner(smollm2, peft, expected):
    args = {k: v for k, v in peft.items() if k in PLANNER_KEYS[peft["method"]]}
    assert closed_form(smollm2, peft) == expected
    assert peft_trainable_params(smollm2, peft["method"], **args) == expected
    assert _model_count(smollm2, peft) == expected


# ------------------------------------------------------------------------------------ Hugging Face PEFT

HF_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
HF_MLP = ["gate_proj", "up_proj", "down_proj"]


def _hf_trainable(spec, peft_config) -> int:
    """Trainable parameters of HF PEFT on a `transformers` model of `spec` built on the meta device."""
    import peft
    import transformers

    from nemo_adapt.models.hf import hf_config_from_spec

    cfg = hf_config_from_spec(spec)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    trainable, _ = peft.get_peft_model(model, peft_config).get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_hf_lora_dora_one_to_one_targets(smollm2, use_dora):
    """o_proj = linear_proj and down_proj = linear_fc2 are the same matrices in both: counts are equal."""
    import peft

    hf = _hf_trainable(smollm2, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"],
                                                use_dora=use_dora))
    ours = {"method": "dora" if use_dora else "lora", "rank": 8, "target_modules": ["linear_proj", "linear_fc2"]}
    # LoRA: 8(576+576) + 8(1536+576) = 26,112 per layer; DoRA adds 576 + 576 magnitudes: 27,264.
    assert hf == closed_form(smollm2, ours) == (27_264 if use_dora else 26_112) * 30


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_hf_lora_dora_all_linear_layers(smollm2, use_dora):
    """All linear layers. The definitions differ on fused layers: Megatron fuses q/k/v into linear_qkv and
    gate/up into linear_fc1, and one LoRA pair on a fused layer has one A [r, h] where HF has one per
    projection (3 for q, k, v; 2 for gate, up). The B rows and DoRA magnitudes cover the same outputs.
    So HF = ours + L * r * (2h + h) = ours + 30 x 8 x 1,728 = ours + 414,720."""
    import peft

    hf = _hf_trainable(smollm2, peft.LoraConfig(r=8, lora_alpha=16, target_modules=HF_ATTN + HF_MLP,
                                                use_dora=use_dora))
    ours = closed_form(smollm2, {"method": "dora" if use_dora else "lora", "rank": 8})
    assert hf == ours + 30 * 8 * (2 * 576 + 576) == ours + 414_720


def test_hf_ia3_same_definition(smollm2):
    """HF's IA3 defaults for Llama: vectors on k_proj and v_proj outputs and on down_proj's input
    (feed-forward), which are our keys, values and ffn: equal counts."""
    import peft

    hf = _hf_trainable(smollm2, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"]))
    assert hf == closed_form(smollm2, {"method": "ia3"}) == 57_600
    hf_v = _hf_trainable(smollm2, peft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    assert hf_v == closed_form(smollm2, {"method": "ia3", "targets": ["values"]}) == 30 * 192
